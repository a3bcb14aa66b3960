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

import torch
from torch import nn

from lightning_qlora.adapters.base import AdapterConfigError, AdapterLayer, check_positive_int


@dataclass(frozen=True)
class LoRAConfig:
    """Low-rank adapter settings.

    Attributes:
        r: rank, 1 <= r <= min(in, out).
        alpha: scale numerator; the update is multiplied by ``alpha / r``.
        dropout: dropout probability on the adapter's input.
        rslora: scale by ``alpha / sqrt(r)`` instead (rank-stabilized LoRA).
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    rslora: bool = False
    method = "lora"

    def __post_init__(self) -> None:
        check_positive_int(self.method, "r", self.r, " (typical: 4..64)")
        if not 0.0 <= self.dropout < 1.0:
            raise AdapterConfigError(f"{self.method}: dropout={self.dropout!r} must be in [0, 1).")

    @property
    def scaling(self) -> float:
        return self.alpha / math.sqrt(self.r) if self.rslora else self.alpha / self.r

    def build(self, base: nn.Module) -> LoRALayer:
        return LoRALayer(base, self)


def check_rank(r: int, in_features: int, out_features: int, method: str) -> None:
    """Raise :class:`AdapterConfigError` unless ``r <= min(in, out)``."""
    if r > min(in_features, out_features):
        raise AdapterConfigError(
            f"{method}: r={r} exceeds min(in_features={in_features}, out_features={out_features}); "
            "a rank above that adds parameters without adding expressiveness. Lower r."
        )


class LoRALayer(AdapterLayer):
    """``base(x) + scaling * lora_B(lora_A(dropout(x)))``; ``lora_A`` ``(r, in)``, ``lora_B`` ``(out, r)``."""

    def __init__(self, base: nn.Module, config: LoRAConfig) -> None:
        super().__init__(base, config)
        check_rank(config.r, self.in_features, self.out_features, config.method)
        device = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(config.r, self.in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, config.r, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear (and PEFT) initialize
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.scaling = config.scaling

    def lora_out(self, x: torch.Tensor) -> torch.Tensor:
        """``B A x`` (unscaled), ``x (..., in) -> (..., out)``."""
        return torch.nn.functional.linear(torch.nn.functional.linear(x, self.lora_A.to(x.dtype)), self.lora_B.to(x.dtype))

    def delta(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        return self.lora_out(self.dropout(x)) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling
