"""VeRA: vector-based random matrix adaptation (Kopiczko et al., https://arxiv.org/abs/2310.11454).

``h = W0 x + Lambda_b B Lambda_d A x`` with frozen random ``A (r, in)`` and ``B (out, r)``
shared by every adapted layer of the same shape, and trainable scaling vectors
``lambda_d (r,)`` (init ``d_initial``) and ``lambda_b (out,)`` (init 0, so a fresh adapter
changes nothing). ``A`` and ``B`` are regenerated from ``seed`` and the shape, so they are
not saved; every shape's pair is a slice of one global pair (up to the per-layer
``1/sqrt(in)`` scale, which exports fold into ``lambda_d``), so PEFT's layout can hold them.
Trainable parameters per layer: ``r + out``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from lightning_qlora.adapters.base import AdapterConfigError, AdapterLayer, check_positive_int


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


_STREAMS: dict[tuple[int, int, int, int], tuple[torch.Tensor, torch.Tensor]] = {}


def _uniform_prefix(seed: int, rows: int, r: int) -> torch.Tensor:
    """``(rows, r)`` draws of U(-1, 1) from ``seed``; a longer request extends a shorter one."""
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(rows, r, generator=generator) * 2 - 1


def shared_projections(seed: int, r: int, in_features: int, out_features: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The frozen ``(A, B)`` pair for this seed, rank and shape (the same tensors for every layer of it).

    Both come from prefix-stable streams -- ``A^T`` is the first ``in`` rows of one
    ``(n, r)`` uniform stream, ``B`` the first ``out`` rows of another -- so every shape's
    pair is a slice of one global pair (what PEFT stores), scaled Kaiming-style:
    ``A = U(-1, 1) / sqrt(in)``, ``B = U(-1, 1) / sqrt(r)``.
    """
    key = (seed, r, in_features, out_features)
    if key not in _STREAMS:
        a = _uniform_prefix(2 * seed, in_features, r).T / math.sqrt(in_features)
        b = _uniform_prefix(2 * seed + 1, out_features, r) / math.sqrt(r)
        _STREAMS[key] = (a.contiguous(), b.contiguous())
    a, b = _STREAMS[key]
    return a.to(device), b.to(device)


def global_projections(seed: int, r: int, max_in: int, max_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Unscaled ``A_g (r, max_in)`` and scaled ``B_g (max_out, r)``: layer ``A = A_g[:, :in] / sqrt(in)``, ``B = B_g[:out]``."""
    return _uniform_prefix(2 * seed, max_in, r).T.contiguous(), _uniform_prefix(2 * seed + 1, max_out, r) / math.sqrt(r)


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

    @torch.no_grad()
    def use_projections(self, vera_A: torch.Tensor, vera_B: torch.Tensor) -> None:
        """Replace the seeded projections by given ones (e.g. PEFT's), which are then saved with the adapter."""
        if vera_A.shape != self.vera_A.shape or vera_B.shape != self.vera_B.shape:
            raise AdapterConfigError(
                f"VeRA projections of shapes {tuple(vera_A.shape)}/{tuple(vera_B.shape)} do not fit this layer's "
                f"{tuple(self.vera_A.shape)}/{tuple(self.vera_B.shape)}."
            )
        self.vera_A = vera_A.detach().clone().to(self.vera_A.device)
        self.vera_B = vera_B.detach().clone().to(self.vera_B.device)
        self._non_persistent_buffers_set.difference_update({"vera_A", "vera_B"})

    def delta(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        projected = torch.nn.functional.linear(self.dropout(x), self.vera_A.to(x.dtype)) * self.lambda_d.to(x.dtype)
        return torch.nn.functional.linear(projected, self.vera_B.to(x.dtype)) * self.lambda_b.to(x.dtype)

    def delta_weight(self) -> torch.Tensor:
        return (self.lambda_b.float().unsqueeze(1) * self.vera_B.float()) @ (
            self.lambda_d.float().unsqueeze(1) * self.vera_A.float()
        )
