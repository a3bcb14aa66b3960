"""AdaLoRA layer: SVD-shaped adaptation with prunable ranks (Zhang et al., https://arxiv.org/abs/2303.10512).

``h = W0 x + alpha / r * P diag(lambda * mask) Q dropout(x)`` with ``Q = lora_A (r, in)``,
``lambda = lora_E (r,)``, ``P = lora_B (out, r)``; ``lambda`` starts at zero (a fresh adapter
changes nothing), ``P`` and ``Q`` at N(0, 0.02^2), and the divisor stays the initial rank
``r`` as rank is pruned (as PEFT does). Pruning sets ``rank_mask`` entries to 0; which ones
is decided globally by the ``AdaLoRABudget`` callback from :meth:`AdaLoRALayer.triplet_scores`.

* ``extra_loss()`` = ``orth_reg_weight * (||P^T P - I||_F^2 + ||Q Q^T - I||_F^2)`` keeps
  ``P``/``Q`` near-orthogonal so ``lambda`` behaves like singular values.
* Importance (call :meth:`AdaLoRALayer.update_importance` after the backward of every
  optimizer step): sensitivity ``I = |w * grad|``, smoothed ``I_bar = b1 I_bar + (1-b1) I``,
  uncertainty ``U_bar = b2 U_bar + (1-b2) |I - I_bar|``, score ``s = I_bar * U_bar``;
  per triplet ``S_i = s(lambda_i) + mean_j s(P_ji) + mean_j s(Q_ij)``.

Trainable parameters: ``r (in + out + 1)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Mapping
from typing import ClassVar

import torch
from torch import nn

from lightning_qlora.adapters.base import AdapterConfig, AdapterConfigError, AdapterLayer, LoRAFactors, PeftState
from lightning_qlora.adapters.lora_function import adapter_dropout


@dataclass(frozen=True, kw_only=True)
class AdaLoRAConfig(AdapterConfig):
    """AdaLoRA layer settings (the schedule's settings live in the ``AdaLoRABudget`` callback).

    Attributes:
        r: initial rank per layer (PEFT's ``init_r``).
        alpha: scale numerator; the update is multiplied by ``alpha / r``.
        dropout: dropout on the adapter's input.
        orth_reg_weight: weight of the orthogonality regularizer in :meth:`AdaLoRALayer.extra_loss`.
    """

    r: int = 12
    alpha: float = 32.0
    dropout: float = 0.0
    orth_reg_weight: float = 0.5
    method: ClassVar[str] = "adalora"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.orth_reg_weight >= 0:
            raise AdapterConfigError(f"adalora: orth_reg_weight={self.orth_reg_weight!r} must be >= 0.")

    @property
    def scaling(self) -> float:
        return self.alpha / (self.r + 1e-5)  # the initial rank stays the divisor as ranks are pruned (as PEFT)

    def lora_factors_from_state(self, name: str, tensors: Mapping[str, torch.Tensor]) -> LoRAFactors:
        try:
            values = tensors[f"{name}.lora_E"].float() * tensors[f"{name}.rank_mask"].float()
            lora_A, lora_B = tensors[f"{name}.lora_A"].float(), tensors[f"{name}.lora_B"].float()
        except KeyError as error:
            raise AdapterConfigError(
                f"adapter tensor {error.args[0]} is missing; the adapter file is incomplete."
            ) from None
        return LoRAFactors(values.unsqueeze(1) * lora_A, lora_B, self.scaling)


class AdaLoRALayer(AdapterLayer):
    """``P diag(lambda * mask) Q`` adapter with importance statistics for rank allocation."""

    def __init__(self, base: nn.Module, config: AdaLoRAConfig) -> None:
        super().__init__(base, config)
        device = base.weight.device
        self.lora_A = nn.Parameter(torch.randn(config.r, self.in_features, device=device) * 0.02)
        self.lora_E = nn.Parameter(torch.zeros(config.r, device=device))
        self.lora_B = nn.Parameter(torch.randn(self.out_features, config.r, device=device) * 0.02)
        self.register_buffer("rank_mask", torch.ones(config.r, device=device))
        self.dropout = adapter_dropout(config.dropout)
        self.scaling = config.scaling
        self._ema: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def rank(self) -> int:
        """Ranks still active (not masked)."""
        return int(self.rank_mask.sum().item())

    def delta(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        values = (self.lora_E * self.rank_mask).to(x.dtype)
        hidden = torch.nn.functional.linear(self.dropout(x), self.lora_A.to(x.dtype)) * values
        return torch.nn.functional.linear(hidden, self.lora_B.to(x.dtype)) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        values = (self.lora_E * self.rank_mask).float()
        return (self.lora_B.float() * values) @ self.lora_A.float() * self.scaling

    def extra_loss(self) -> torch.Tensor:
        eye = torch.eye(self.config.r, device=self.lora_A.device, dtype=self.lora_A.dtype)
        p_term = (self.lora_B.T @ self.lora_B - eye).square().sum()
        q_term = (self.lora_A @ self.lora_A.T - eye).square().sum()
        return self.config.orth_reg_weight * (p_term + q_term)

    @torch.no_grad()
    def update_importance(self, beta1: float = 0.85, beta2: float = 0.85) -> None:
        """Fold the current gradients into the smoothed sensitivity and uncertainty."""
        for name in ("lora_A", "lora_E", "lora_B"):
            param = getattr(self, name)
            if param.grad is None:
                continue
            sensitivity = (param * param.grad).abs()
            if name not in self._ema:
                self._ema[name] = (torch.zeros_like(param), torch.zeros_like(param))
            smoothed, uncertainty = self._ema[name]
            smoothed.mul_(beta1).add_(sensitivity, alpha=1 - beta1)
            uncertainty.mul_(beta2).add_((sensitivity - smoothed).abs(), alpha=1 - beta2)

    def importance_state(self) -> dict[str, torch.Tensor]:
        """The EMA buffers, for checkpointing by the callback."""
        return {f"{n}.{k}": t for n, pair in self._ema.items() for k, t in zip(("I_bar", "U_bar"), pair, strict=True)}

    def load_importance_state(self, state: dict[str, torch.Tensor]) -> None:
        """Restore :meth:`importance_state` output."""
        self._ema = {}
        for name in ("lora_A", "lora_E", "lora_B"):
            if f"{name}.I_bar" in state:
                self._ema[name] = (state[f"{name}.I_bar"].clone(), state[f"{name}.U_bar"].clone())

    def triplet_scores(self) -> torch.Tensor:
        """``S_i`` per rank ``i`` (zeros before any :meth:`update_importance`)."""

        def score(name: str) -> torch.Tensor:
            if name not in self._ema:
                return torch.zeros_like(getattr(self, name))
            smoothed, uncertainty = self._ema[name]
            return smoothed * uncertainty

        return score("lora_E") + score("lora_A").mean(dim=1) + score("lora_B").mean(dim=0)

    def lora_factors(self) -> LoRAFactors:
        values = (self.lora_E * self.rank_mask).detach().float()
        return LoRAFactors(
            values.unsqueeze(1) * self.lora_A.detach().float(), self.lora_B.detach().float(), self.scaling
        )

    def peft_state(self, name: str) -> PeftState:
        config = self.config
        # pruned ranks are exported as zero singular values: PEFT then computes the same outputs
        tensors = {
            "lora_A": self.lora_A.detach().contiguous(),
            "lora_B": self.lora_B.detach().contiguous(),
            "lora_E": (self.lora_E * self.rank_mask).detach().unsqueeze(1).contiguous(),
        }
        peft_config = {
            "peft_type": "ADALORA",
            "init_r": config.r,
            "lora_alpha": config.alpha,
            "lora_dropout": config.dropout,
            "orth_reg_weight": config.orth_reg_weight,
            "total_step": 1,
            "rank_pattern": None,
        }
        return PeftState(peft_config, tensors)

    @torch.no_grad()
    def set_rank_mask(self, mask: torch.Tensor) -> None:
        """Keep ranks where ``mask`` is true (``(r,)``); masked ``lambda`` is also zeroed."""
        if mask.shape != self.rank_mask.shape:
            raise AdapterConfigError(
                f"rank mask must have shape {tuple(self.rank_mask.shape)}, got {tuple(mask.shape)}"
            )
        self.rank_mask.copy_(mask.to(self.rank_mask.dtype))
        self.lora_E.mul_(self.rank_mask)


AdaLoRAConfig.layer_class = AdaLoRALayer
