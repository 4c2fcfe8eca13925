"""The floor to beat: a linear probe on the last layer's first token ([CLS])."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from bertvision.adapters import AdapterConfig, Dropout, register
from bertvision.batch import TokenBatch


@dataclass
class ClsConfig(AdapterConfig):
    pass


class ClsProbe(nn.Module):
    def __init__(self, config: ClsConfig) -> None:
        super().__init__()
        self.config = config
        self.dropout = Dropout(config.dropout)
        self.head = nn.Linear(config.hidden_size, config.num_labels)

    def forward(self, batch: TokenBatch) -> torch.Tensor:
        cls = batch.first(batch.tokens[:, -1])  # (B, H): last layer, first token
        return self.head(self.dropout(cls))  # (B, C)


register("cls", ClsConfig, ClsProbe)
