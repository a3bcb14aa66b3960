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
from typing import ClassVar

import torch
from torch import nn

from lightning_qlora.adapters.base import AdapterConfig, AdapterConfigError, AdapterLayer, LoRAFactors, PeftState
from lightning_qlora.adapters.lora_function import adapter_dropout


@dataclass(frozen=True, kw_only=True)
class VeRAConfig(AdapterConfig):
    """VeRA settings (no ``alpha``: the trained vectors carry the scale, as in the paper and PEFT).

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
    method: ClassVar[str] = "vera"


_STREAMS: dict[tuple[int, int, int, int], tuple[torch.Tensor, torch.Tensor]] = {}


def _uniform_prefix(seed: int, rows: int, r: int) -> torch.Tensor:
    """``(rows, r)`` draws of U(-1, 1) from ``seed``; a longer request extends a shorter one."""
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(rows, r, generator=generator) * 2 - 1


def shared_projections(
    seed: int, r: int, in_features: int, out_features: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
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
        self.projection_scale = 1 / math.sqrt(self.in_features)  # ours: A = A_g[:, :in] / sqrt(in)
        self.lambda_d = nn.Parameter(torch.full((config.r,), float(config.d_initial), device=device))
        self.lambda_b = nn.Parameter(torch.zeros(self.out_features, device=device))
        self.dropout = adapter_dropout(config.dropout)

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
        self.projection_scale = 1.0  # given projections are used as they are

    def delta(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        projected = torch.nn.functional.linear(self.dropout(x), self.vera_A.to(x.dtype)) * self.lambda_d.to(x.dtype)
        return torch.nn.functional.linear(projected, self.vera_B.to(x.dtype)) * self.lambda_b.to(x.dtype)

    def delta_weight(self) -> torch.Tensor:
        return (self.lambda_b.float().unsqueeze(1) * self.vera_B.float()) @ (
            self.lambda_d.float().unsqueeze(1) * self.vera_A.float()
        )

    def lora_factors(self) -> LoRAFactors:
        # Lambda_b B Lambda_d A = (Lambda_b B)(Lambda_d A): a rank-r product with scale 1
        lora_A = self.lambda_d.detach().float().unsqueeze(1) * self.vera_A.float()
        lora_B = self.lambda_b.detach().float().unsqueeze(1) * self.vera_B.float()
        return LoRAFactors(lora_A, lora_B, 1.0)

    def prepare_load(self, model: nn.Module, name: str, tensors: dict[str, torch.Tensor]) -> None:
        # adapters saved with explicit projections (PEFT's, or ours after importing PEFT's) bring their own
        if f"{name}.vera_A" in tensors and f"{name}.vera_B" in tensors:
            self.use_projections(tensors[f"{name}.vera_A"], tensors[f"{name}.vera_B"])

    def peft_state(self, name: str) -> PeftState:
        config = self.config
        # PEFT keeps one unscaled global A and slices it per layer; a seeded A is that slice times
        # 1/sqrt(in), so the scale moves into lambda_d and the unscaled slice is regenerated exactly
        if self.projection_scale != 1.0:
            vera_a = _uniform_prefix(2 * config.seed, self.in_features, config.r).T.contiguous()
        else:
            vera_a = self.vera_A.detach().float()
        tensors = {
            "vera_lambda_b": self.lambda_b.detach().contiguous(),
            "vera_lambda_d": (self.lambda_d.detach() * self.projection_scale).contiguous(),
        }
        peft_config = {
            "peft_type": "VERA",
            "r": config.r,
            "projection_prng_key": config.seed,
            "save_projection": True,
            "vera_dropout": config.dropout,
            "d_initial": config.d_initial,
        }
        return PeftState(peft_config, tensors, {"vera_A": vera_a, "vera_B": self.vera_B.detach().float()})


VeRAConfig.layer_class = VeRALayer
