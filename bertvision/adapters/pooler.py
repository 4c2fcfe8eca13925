"""AdapterPooler ("LayerWeightShare"): one small adapter shared by every layer and token.

After BERTVision's original AdapterPooler (Houlsby-style bottleneck adapters, Houlsby et al.
2019, applied to stored hidden states), with the padding mask respected:

    a[l, t] = h[l, t] + up(gelu(down(h[l, t])))    same weights for every layer l and token t
    p[l]    = [a[l, 0] ; mean of a[l, t] over real tokens t]     ("cls+mean"; or one of them)
    z       = sum over l of softmax(w)[l] * p[l]  learned layer weights
    logits  = head(dropout(z))

`up` starts near zero (`init_scale`), so training starts from the stored embeddings themselves
and learns a correction that all layers share. `SharedLayerAdapter` is that body (the first and
third lines); the span adapter (span.py) applies it per token, without the pooling.

Computed on real tokens only, and `up` after pooling: `down` and the gelu run on the batch's
real tokens packed together (bertvision.batch.TokenBatch: adapters never see padding); `up` is
linear (and the layer weights sum to 1), so the mean over tokens of up(g[l, t]) is up(the mean
of g[l, t]), and `up` runs once per pooled vector instead of once per layer and token. The
formulas above (outputs and gradients equal up to rounding: tests/test_adapters.py); on an RTE
batch of MiniLM states about half the positions are padding, and `up` was half the arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from bertvision.adapters import AdapterConfig, Dropout, register
from bertvision.batch import TokenBatch

TOKEN_POOLS = ("cls+mean", "mean", "cls")


def check_adapter_dim(config: AdapterConfig) -> None:
    if config.adapter_dim < 1:
        raise ValueError(f"adapter_dim must be >= 1, got {config.adapter_dim}")


@dataclass
class PoolerConfig(AdapterConfig):
    adapter_dim: int = 64  # bottleneck width of the shared per-layer, per-token adapter
    token_pool: str = "cls+mean"  # pool over tokens: first token, masked mean, or both joined
    init_scale: float = 1e-3  # std of the up-projection at start: the adapter starts as ~identity

    def __post_init__(self) -> None:
        super().__post_init__()
        check_adapter_dim(self)
        if self.token_pool not in TOKEN_POOLS:
            raise ValueError(
                f"token_pool must be one of {', '.join(TOKEN_POOLS)}, got {self.token_pool!r}"
            )


class SharedLayerAdapter(nn.Module):
    """The body: a bottleneck adapter with a residual skip, one set of weights for every layer
    and token (`bottleneck`, then `up`), and learned softmax weights over the layers (`mix`).
    Its parameters are `down`, `up` and `layer_logits`, the names saved adapters hold."""

    def __init__(self, layers: int, hidden_size: int, adapter_dim: int, init_scale: float) -> None:
        super().__init__()
        self.down = nn.Linear(hidden_size, adapter_dim)
        self.up = nn.Linear(adapter_dim, hidden_size)
        nn.init.normal_(self.up.weight, std=init_scale)
        nn.init.zeros_(self.up.bias)
        self.layer_logits = nn.Parameter(torch.zeros(layers))  # softmax -> layer weights

    def bottleneck(self, tokens: torch.Tensor) -> torch.Tensor:
        """gelu(down(h)) of each token and layer: (N, L, H) -> (N, L, D), D = adapter_dim. The
        adapter's output is h + up(that); `up` is applied by the caller, after any (linear)
        pooling over tokens or layers."""
        layers = tokens.shape[1]
        expected = self.layer_logits.shape[0]
        assert layers == expected, f"{layers} layers, adapter has {expected}"
        return nn.functional.gelu(self.down(tokens))

    def mix(self, values: torch.Tensor, equation: str) -> torch.Tensor:
        """The softmax-weighted sum over the layer axis `l` of `values`, by einsum `equation`
        ("blp,l->bp"): the layer weights are its last operand."""
        return torch.einsum(equation, values, torch.softmax(self.layer_logits, dim=0))


class AdapterPooler(SharedLayerAdapter):
    def __init__(self, config: PoolerConfig) -> None:
        super().__init__(config.layers, config.hidden_size, config.adapter_dim, config.init_scale)
        self.config = config
        self.dropout = Dropout(config.dropout)
        pooled = 2 * config.hidden_size if config.token_pool == "cls+mean" else config.hidden_size
        self.head = nn.Linear(pooled, config.num_labels)

    def forward(self, batch: TokenBatch) -> torch.Tensor:
        """The batch's real tokens (N, L, H) -> logits (B, C); see the module's docstring."""
        tokens = batch.tokens
        squeezed = self.bottleneck(tokens)  # (N, L, D)
        states, squeezes = [], []  # h and gelu(down(h)) of each pooled vector, (B, L, H | D)
        if self.config.token_pool in ("cls+mean", "cls"):
            states.append(batch.first(tokens))
            squeezes.append(batch.first(squeezed))
        if self.config.token_pool in ("cls+mean", "mean"):
            states.append(batch.mean(tokens))
            squeezes.append(batch.mean(squeezed))
        adapted = torch.stack(states, 2) + self.up(torch.stack(squeezes, 2))  # (B, L, parts, H)
        pooled = adapted.flatten(2)  # (B, L, P): [cls ; mean] joined as before
        mixed = self.mix(pooled, "blp,l->bp")  # (B, P)
        return self.head(self.dropout(mixed))  # (B, C)


register("pooler", PoolerConfig, AdapterPooler)
