"""The span adapter: the AdapterPooler's body applied per token, with start and end logits.

For span tasks (SQuAD 2.0), on the stored hidden states of a window:

    a[l, t]  = h[l, t] + up(gelu(down(h[l, t])))   the pooler's shared adapter (pooler.py)
    m[t]     = sum over l of softmax(w)[l] * a[l, t]   its learned layer weights, no token pooling
    s[t], e[t] = head(dropout(m[t]))                 a linear layer to 2 logits per token

as BERT's span head (Devlin et al. 2019, SQuAD): the answer's start and end are the tokens of
the highest start and end logits, "no answer" is the span at the [CLS] position (token 0), and
padded positions get -inf so that neither a softmax nor a best span ever picks them.

Computed on the real tokens only (bertvision.batch.TokenBatch), and with `up` after the layer
mix: `up` is linear and the layer weights sum to 1, so m[t] = sum of w[l] h[l, t] + up(sum of w[l]
gelu(down(h[l, t]))); `up` runs once per token, not once per layer and token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from bertvision.adapters import AdapterConfig, Dropout, register
from bertvision.adapters.pooler import SharedLayerAdapter, check_adapter_dim
from bertvision.batch import TokenBatch


@dataclass
class SpanConfig(AdapterConfig):
    num_labels: int = 2  # start and end; nothing else
    adapter_dim: int = 64  # bottleneck width of the shared per-layer, per-token adapter
    init_scale: float = 1e-3  # std of the up-projection at start: the adapter starts as ~identity

    schema: ClassVar[str] = "span"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_labels != 2:
            raise ValueError(f"num_labels must be 2 (start, end), got {self.num_labels}")
        check_adapter_dim(self)


class SpanAdapter(SharedLayerAdapter):
    def __init__(self, config: SpanConfig) -> None:
        super().__init__(config.layers, config.hidden_size, config.adapter_dim, config.init_scale)
        self.config = config
        self.dropout = Dropout(config.dropout)
        self.head = nn.Linear(config.hidden_size, 2)

    def forward(self, batch: TokenBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's real tokens (N, L, H) -> start and end logits, each (B, T) in the padded
        layout of its longest window, -inf at the padding."""
        tokens = batch.tokens
        squeezed = self.mix(self.bottleneck(tokens), "nld,l->nd")  # (N, D)
        adapted = self.mix(tokens, "nlh,l->nh") + self.up(squeezed)  # (N, H)
        # dropout over the padded (B, T, H), as before: the same draws from its generator
        logits = self.head(self.dropout(batch.scatter(adapted)))  # (B, T, 2)
        logits = logits.masked_fill(~batch.mask[:, :, None], float("-inf"))
        return logits[..., 0], logits[..., 1]


register("span", SpanConfig, SpanAdapter)
