"""Scalar mix over layers (ELMo, Peters et al. 2018; Tenney et al. 2019), masked mean, linear head.

    m[t]   = gamma * sum over l of softmax(w)[l] * h[l, t]   learned weights w and scale gamma
    z      = mean of m[t] over real tokens t
    logits = head(dropout(z))

The softmax is taken over the layer weights w (trained parameters), not over the activations.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from bertvision.adapters import AdapterConfig, Dropout, register
from bertvision.batch import TokenBatch


@dataclass
class ScalarMixConfig(AdapterConfig):
    pass


class ScalarMix(nn.Module):
    def __init__(self, config: ScalarMixConfig) -> None:
        super().__init__()
        self.config = config
        self.layer_logits = nn.Parameter(torch.zeros(config.layers))  # w: equal weights at start
        self.scale = nn.Parameter(torch.ones(()))  # gamma
        self.dropout = Dropout(config.dropout)
        self.head = nn.Linear(config.hidden_size, config.num_labels)

    def layer_weights(self) -> torch.Tensor:
        return torch.softmax(self.layer_logits, dim=0)  # (L,)

    def forward(self, batch: TokenBatch) -> torch.Tensor:
        layers = batch.tokens.shape[1]
        assert layers == self.config.layers, f"{layers} layers, adapter has {self.config.layers}"
        mixed = self.scale * torch.einsum("nlh,l->nh", batch.tokens, self.layer_weights())  # (N, H)
        pooled = batch.mean(mixed)  # (B, H)
        return self.head(self.dropout(pooled))  # (B, C)


register("scalarmix", ScalarMixConfig, ScalarMix)
