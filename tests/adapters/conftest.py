"""Small models shared by the adapter tests."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn


class TwoProj(nn.Module):
    """A block with attention-like projection names, so PEFT and we target the same layers."""

    def __init__(self, dim: int = 128, hidden: int = 64) -> None:
        super().__init__()
        self.q_proj = nn.Linear(dim, hidden)
        self.v_proj = nn.Linear(hidden, dim, bias=False)
        self.lm_head = nn.Linear(dim, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(torch.relu(self.v_proj(torch.relu(self.q_proj(x)))))


@pytest.fixture
def two_proj() -> TwoProj:
    torch.manual_seed(0)
    return TwoProj()


@pytest.fixture
def clone():
    return copy.deepcopy
