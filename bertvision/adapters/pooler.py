"""AdapterPooler ("LayerWeightShare"): one small adapter shared by every layer and token.

After BERTVision's original AdapterPooler (Houlsby-style bottleneck adapters, Houlsby et al.
2019, applied to stored hidden states), with the padding mask respected:

    a[l, t] = h[l, t] + up(gelu(down(h[l, t])))    same weights for every layer l and token t
    p[l]    = [a[l, 0] ; mean of a[l, t] over real tokens t]     ("cls+mean"; or one of them)
    z       = sum over l of softmax(w)[l] * p[l]  learned layer weights
    logits  = head(dropout(z))

`up` starts near zero (`init_scale`), so training starts from the stored embeddings themselves
and learns a correction that all layers share.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from bertvision.adapters import AdapterConfig, Dropout, masked_mean, register

TOKEN_POOLS = ("cls+mean", "mean", "cls")


@dataclass
class PoolerConfig(AdapterConfig):
    adapter_dim: int = 64  # bottleneck width of the shared per-layer, per-token adapter
    token_pool: str = "cls+mean"  # pool over tokens: first token, masked mean, or both joined
    init_scale: float = 1e-3  # std of the up-projection at start: the adapter starts as ~identity

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.adapter_dim < 1:
            raise ValueError(f"adapter_dim must be >= 1, got {self.adapter_dim}")
        if self.token_pool not in TOKEN_POOLS:
            raise ValueError(
                f"token_pool must be one of {', '.join(TOKEN_POOLS)}, got {self.token_pool!r}"
            )


class AdapterPooler(nn.Module):
    def __init__(self, config: PoolerConfig) -> None:
        super().__init__()
        self.config = config
        hidden = config.hidden_size
        self.down = nn.Linear(hidden, config.adapter_dim)
        self.up = nn.Linear(config.adapter_dim, hidden)
        nn.init.normal_(self.up.weight, std=config.init_scale)
        nn.init.zeros_(self.up.bias)
        self.layer_logits = nn.Parameter(torch.zeros(config.layers))  # softmax -> layer weights
        self.dropout = Dropout(config.dropout)
        pooled = 2 * hidden if config.token_pool == "cls+mean" else hidden
        self.head = nn.Linear(pooled, config.num_labels)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        layers = hidden.shape[1]
        assert layers == self.config.layers, f"{layers} layers, adapter has {self.config.layers}"
        adapted = hidden + self.up(nn.functional.gelu(self.down(hidden)))  # (B, L, T, H)
        parts = []
        if self.config.token_pool in ("cls+mean", "cls"):
            parts.append(adapted[:, :, 0])  # (B, L, H): the first token is always real
        if self.config.token_pool in ("cls+mean", "mean"):
            parts.append(masked_mean(adapted, mask))  # (B, L, H)
        pooled = torch.cat(parts, dim=-1)  # (B, L, P)
        weights = torch.softmax(self.layer_logits, dim=0)  # (L,)
        mixed = torch.einsum("blp,l->bp", pooled, weights)  # (B, P)
        return self.head(self.dropout(mixed))  # (B, C)


register("pooler", PoolerConfig, AdapterPooler)
