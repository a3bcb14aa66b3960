"""Mixture of LoRA experts (MoLoRA / MoRAL; Zadouri et al., https://arxiv.org/abs/2309.05444).

``h = W0 x + s * sum_e g_e(x) B_e A_e dropout(x)`` with ``E`` LoRA experts
(``A (E, r, in)``, ``B (E, out, r)``, B zero so a fresh adapter changes nothing) and a
router ``g(x) = renormalize(top_k(softmax(R x)))``, ``R (E, in)``.

``extra_loss()`` is the Switch-Transformer load-balancing loss of the last forward,
``weight * E * sum_e f_e * P_e`` with ``f_e`` the fraction of routing slots that chose expert
``e`` and ``P_e`` its mean router probability (1.0 * weight when perfectly balanced).
The gate depends on the input, so the experts cannot be merged into the base weight.
Trainable parameters: ``E r (in + out) + E in``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from lightning_qlora.adapters.base import (
    AdapterConfig,
    AdapterConfigError,
    AdapterLayer,
    MergeReport,
    check_positive_int,
)
from lightning_qlora.adapters.lora_function import adapter_dropout


@dataclass(frozen=True, kw_only=True)
class MixtureLoRAConfig(AdapterConfig):
    """Mixture-of-LoRA-experts settings.

    Attributes:
        r: rank of every expert.
        alpha: scale numerator (``s = alpha / r``).
        num_experts: ``E``.
        top_k: experts each token uses, 1 <= top_k <= E.
        dropout: dropout on the adapter's input.
        load_balance_weight: weight of the load-balancing loss.
    """

    r: int = 4
    alpha: float = 8.0
    num_experts: int = 4
    top_k: int = 2
    dropout: float = 0.0
    load_balance_weight: float = 0.01
    method: ClassVar[str] = "moe_lora"

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("num_experts", "top_k"):
            check_positive_int(self.method, name, getattr(self, name))
        if self.top_k > self.num_experts:
            raise AdapterConfigError(f"moe_lora: top_k={self.top_k} exceeds num_experts={self.num_experts}.")
        if not self.load_balance_weight >= 0:
            raise AdapterConfigError(f"moe_lora: load_balance_weight={self.load_balance_weight!r} must be >= 0.")


class MixtureLoRALayer(AdapterLayer):
    """``E`` LoRA experts behind a top-k softmax router."""

    def __init__(self, base: nn.Module, config: MixtureLoRAConfig) -> None:
        super().__init__(base, config)
        device, e, r = base.weight.device, config.num_experts, config.r
        self.lora_A = nn.Parameter(torch.empty(e, r, self.in_features, device=device))
        nn.init.uniform_(self.lora_A, -1 / math.sqrt(self.in_features), 1 / math.sqrt(self.in_features))
        self.lora_B = nn.Parameter(torch.zeros(e, self.out_features, r, device=device))
        self.router = nn.Parameter(torch.randn(e, self.in_features, device=device) * 0.02)
        self.dropout = adapter_dropout(config.dropout)
        self.scaling = config.alpha / r
        self._balance: torch.Tensor | None = None

    def gates(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(gates, probs)``, both ``(..., E)``: renormalized top-k weights (0 elsewhere), router softmax."""
        probs = torch.softmax(torch.nn.functional.linear(x, self.router.to(x.dtype)).float(), dim=-1)
        top, index = probs.topk(self.config.top_k, dim=-1)
        gates = torch.zeros_like(probs).scatter(-1, index, top / top.sum(-1, keepdim=True))
        return gates.to(x.dtype), probs

    def delta(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        gates, probs = self.gates(x)
        chosen = (gates > 0).float().reshape(-1, self.config.num_experts)
        fraction = chosen.mean(0) / self.config.top_k
        self._balance = self.config.num_experts * (fraction * probs.reshape(-1, self.config.num_experts).mean(0)).sum()
        hidden = torch.einsum("...i,eri->...er", self.dropout(x), self.lora_A.to(x.dtype))
        experts = torch.einsum("...er,eor->...eo", hidden * gates.unsqueeze(-1), self.lora_B.to(x.dtype))
        return experts.sum(-2) * self.scaling

    def extra_loss(self) -> torch.Tensor:
        if self._balance is None:
            return torch.zeros((), device=self.router.device)
        return self.config.load_balance_weight * self._balance

    def delta_weight(self) -> torch.Tensor:
        raise AdapterConfigError("a mixture of LoRA experts cannot be merged: its gate depends on the input.")

    def merge(self) -> MergeReport:
        raise AdapterConfigError("a mixture of LoRA experts cannot be merged: its gate depends on the input.")


MixtureLoRAConfig.layer_class = MixtureLoRALayer
