"""VeRA: vector-based random matrix adaptation (Kopiczko et al., https://arxiv.org/abs/2310.11454).

``h = W0 x + Lambda_b B Lambda_d A x`` with frozen random ``A (r, in)`` and ``B (out, r)``
shared by every adapted layer of the same shape, and trainable scaling vectors
``lambda_d (r,)`` (init ``d_initial``) and ``lambda_b (out,)`` (init 0, so a fresh adapter
changes nothing). ``A`` and ``B`` are regenerated from ``seed`` and the shape, so they are
not saved. Trainable parameters per layer: ``r + out``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from lightning_qlora.adapters.base import AdapterLayer, check_positive_int


@dataclass(frozen=True)
class VeRAConfig:
    """VeRA settings.

    Attributes:
        r: rank of the shared random projections (VeRA uses large ranks, e.g. 256).
        d_initial: initial value of ``lambda_d``.
        seed: seed the shared projections are generated from.
        dropout: dropout probability on the adapter's input.
    """

    r: int = 256
    d_initial: float = 0.1
    seed: int = 0
    dropout: float = 0.0
    method = "vera"

    def __post_init__(self) -> None:
        check_positive_int(self.method, "r", self.r, " (VeRA typically uses 256)")

    def build(self, base: nn.Module) -> VeRALayer:
        return VeRALayer(base, self)


_SHARED: dict[tuple[int, int, int, int, str], tuple[torch.Tensor, torch.Tensor]] = {}


def shared_projections(seed: int, r: int, in_features: int, out_features: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The frozen ``(A, B)`` pair for this seed, rank and shape (the same tensors for every layer).

    Kaiming-uniform (bound ``1 / sqrt(fan_in)``) from a CPU generator seeded with
    ``seed * 1_000_003 + in * 65_537 + out``, so it is reproducible anywhere.
    """
    key = (seed, r, in_features, out_features, str(device))
    if key not in _SHARED:
        generator = torch.Generator().manual_seed(seed * 1_000_003 + in_features * 65_537 + out_features)
        a = (torch.rand(r, in_features, generator=generator) * 2 - 1) / math.sqrt(in_features)
        b = (torch.rand(out_features, r, generator=generator) * 2 - 1) / math.sqrt(r)
        _SHARED[key] = (a.to(device), b.to(device))
    return _SHARED[key]


class VeRALayer(AdapterLayer):
    """``base(x) + lambda_b * (B (lambda_d * (A dropout(x))))``."""

    def __init__(self, base: nn.Module, config: VeRAConfig) -> None:
        super().__init__(base, config)
        device = base.weight.device
        a, b = shared_projections(config.seed, config.r, self.in_features, self.out_features, device)
        self.register_buffer("vera_A", a, persistent=False)
        self.register_buffer("vera_B", b, persistent=False)
        self.lambda_d = nn.Parameter(torch.full((config.r,), float(config.d_initial), device=device))
        self.lambda_b = nn.Parameter(torch.zeros(self.out_features, device=device))
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()

    def delta(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        projected = torch.nn.functional.linear(self.dropout(x), self.vera_A.to(x.dtype)) * self.lambda_d.to(x.dtype)
        return torch.nn.functional.linear(projected, self.vera_B.to(x.dtype)) * self.lambda_b.to(x.dtype)

    def delta_weight(self) -> torch.Tensor:
        return (self.lambda_b.float().unsqueeze(1) * self.vera_B.float()) @ (
            self.lambda_d.float().unsqueeze(1) * self.vera_A.float()
        )
