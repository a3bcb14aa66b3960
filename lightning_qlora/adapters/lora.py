"""LoRA: low-rank adaptation (Hu et al., https://arxiv.org/abs/2106.09685).

``h = W0 x + s * B A dropout(x)`` with ``A (r, in)`` Kaiming-uniform, ``B (out, r)`` zero
(so a fresh adapter changes nothing) and ``s = alpha / r``, or ``alpha / sqrt(r)`` with
rsLoRA (https://arxiv.org/abs/2312.03732). Trainable parameters: ``r * (in + out)``.

Example:
    >>> layer = LoRAConfig(r=8, alpha=16).build(torch.nn.Linear(64, 32))
    >>> layer(torch.randn(2, 64)).shape
    torch.Size([2, 32])
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from lightning_qlora.adapters.base import AdapterConfig, AdapterConfigError, AdapterLayer, LoRAFactors, PeftState
from lightning_qlora.adapters.lora_function import adapter_dropout, lora_update


@dataclass(frozen=True, kw_only=True)
class LoRAConfig(AdapterConfig):
    """Low-rank adapter settings.

    Attributes:
        r: rank (a rank above a layer's ``min(in, out)`` is allowed, as in PEFT; it adds
            parameters without adding expressiveness).
        alpha: scale numerator; the update is multiplied by ``alpha / r``.
        dropout: dropout probability on the adapter's input.
        rslora: scale by ``alpha / sqrt(r)`` instead (rank-stabilized LoRA).
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    rslora: bool = False
    method: ClassVar[str] = "lora"

    @property
    def scaling(self) -> float:
        return self.alpha / math.sqrt(self.r) if self.rslora else self.alpha / self.r

    def lora_factors_from_state(self, name: str, tensors: Mapping[str, torch.Tensor]) -> LoRAFactors:
        lora_A, lora_B = _required(tensors, name, "lora_A"), _required(tensors, name, "lora_B")
        return LoRAFactors(lora_A.float(), lora_B.float(), self.scaling)


def _required(tensors: Mapping[str, torch.Tensor], name: str, key: str) -> torch.Tensor:
    try:
        return tensors[f"{name}.{key}"]
    except KeyError:
        raise AdapterConfigError(f"adapter tensor {name}.{key} is missing; the adapter file is incomplete.") from None


class LoRALayer(AdapterLayer):
    """``base(x) + scaling * lora_B(lora_A(dropout(x)))``; ``lora_A`` ``(r, in)``, ``lora_B`` ``(out, r)``.

    The update runs as one autograd op (:func:`~lightning_qlora.adapters.lora_function.lora_update`:
    dropout mask, both products and the scale, with a hand-written backward); the dropout is
    :class:`~lightning_qlora.adapters.lora_function.AdapterDropout` (no mask at all when ``p == 0``).
    """

    def __init__(self, base: nn.Module, config: LoRAConfig) -> None:
        super().__init__(base, config)
        device = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(config.r, self.in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, config.r, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear (and PEFT) initialize
        self.dropout = adapter_dropout(config.dropout)
        self.scaling = config.scaling

    def lora_out(self, x: torch.Tensor) -> torch.Tensor:
        """``B A x`` (unscaled), ``x (..., in) -> (..., out)``."""
        return torch.nn.functional.linear(
            torch.nn.functional.linear(x, self.lora_A.to(x.dtype)), self.lora_B.to(x.dtype)
        )

    def _update(self, x: torch.Tensor, base_out: torch.Tensor | None = None) -> torch.Tensor:
        """The update (dropout mask drawn here), or ``base_out`` plus it (:func:`lora_update`'s ``base_out``)."""
        mask, keep = self.dropout.mask(x)
        lora_A, lora_B = self.factors()
        return lora_update(x, lora_A, lora_B, self.scaling, mask, keep, base_out=base_out)

    def delta(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        return self._update(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``base(x) + delta(x)``, the sum taken inside the update's second product (:func:`lora_update`'s ``base_out``).

        Only while :meth:`delta` is this class's own: a subclass (DoRA, Delta-LoRA, LoRA-drop...) or a
        patched ``delta`` gets :class:`AdapterLayer`'s ``base_out + delta(x, base_out)``.
        """
        if self.merged or getattr(self.delta, "__func__", None) is not _LORA_DELTA:
            return super().forward(x)
        return self._update(x, base_out=self.base(x))

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``(A, B)`` pair this layer computes with (LoRA-drop's dropped layers use a shared pair)."""
        return self.lora_A, self.lora_B

    def lora_factors(self) -> LoRAFactors:
        lora_A, lora_B = self.factors()
        return LoRAFactors(lora_A.detach().float(), lora_B.detach().float(), self.scaling)

    def peft_config(self) -> dict[str, Any]:
        """PEFT ``LoraConfig`` fields of this layer's settings."""
        config = self.config
        return {
            "peft_type": "LORA",
            "r": config.r,
            "lora_alpha": config.alpha,
            "lora_dropout": config.dropout,
            "use_rslora": config.rslora,
            "use_dora": False,
        }

    def peft_state(self, name: str) -> PeftState:
        lora_A, lora_B = self.factors()
        tensors = {"lora_A.weight": lora_A.detach().contiguous(), "lora_B.weight": lora_B.detach().contiguous()}
        return PeftState(self.peft_config(), tensors)


_LORA_DELTA = LoRALayer.delta
LoRAConfig.layer_class = LoRALayer
