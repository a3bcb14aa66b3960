"""The interface every adapter implements, and the thin base class they share.

An adapter wraps one frozen base layer ``W0`` (an ``nn.Linear`` or a 4-bit
:class:`~lightning_qlora.quantization.Linear4bit`) and adds a trainable correction:
``h = W0 x + delta(x)``. Subclasses implement :meth:`AdapterLayer.delta` (and
:meth:`AdapterLayer.delta_weight` for merging); everything else is shared:

* ``trainable_parameters()`` / ``param_groups(lr)`` -- what an optimizer should see;
* ``merge()`` / ``unmerge()`` -- fold ``delta_weight()`` into the base (float: exact;
  4-bit: dequantize -> add -> requantize, with the merge error reported), and back;
* ``extra_loss()`` -- a regularizer the training module adds to the loss (0 by default).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lightning_qlora.quantization.linear import Linear4bit
from lightning_qlora.quantization.tensor import Quantized4bitTensor, quantize_4bit


class AdapterConfigError(ValueError):
    """An adapter configuration or adapter file is invalid for the layer it targets."""


@dataclass(frozen=True)
class MergeReport:
    """Outcome of a merge into the base weight.

    Attributes:
        max_abs_error: largest ``|W_merged - (W0 + dW)|`` -- 0 for float bases; for 4-bit
            bases the requantization error the merge introduces.
        relative_error: Frobenius norm of that error over the norm of ``dW``.
    """

    max_abs_error: float
    relative_error: float


def check_positive_int(method: str, name: str, value: object, hint: str = "") -> None:
    """Raise :class:`AdapterConfigError` unless ``value`` is a positive ``int`` (bools excluded)."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise AdapterConfigError(f"{method}: {name}={value!r} must be a positive integer{hint}.")


def base_weight(base: nn.Module, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The base layer's weight as a float tensor ``(out, in)`` (dequantized if 4-bit)."""
    weight = base.weight
    if isinstance(weight, Quantized4bitTensor):
        return weight.dequantize(dtype)
    return weight.detach().to(dtype)


def in_out_features(base: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of a Linear-like base layer."""
    if not isinstance(base, (nn.Linear, Linear4bit)):
        raise AdapterConfigError(
            f"adapters wrap nn.Linear or Linear4bit layers, got {type(base).__name__}; target Linear modules only."
        )
    return base.in_features, base.out_features


class AdapterLayer(nn.Module):
    """A frozen base layer plus a trainable correction (see the module docstring).

    Args:
        base: the layer to adapt; its parameters are frozen.
        config: the method's config (kept for saving and for the summary).
    """

    def __init__(self, base: nn.Module, config: Any) -> None:
        super().__init__()
        self.in_features, self.out_features = in_out_features(base)
        self.base = base
        for parameter in base.parameters():
            parameter.requires_grad_(False)
        self.config = config
        self.merged = False
        self._saved_base_weight: torch.Tensor | None = None

    # -- what each method defines --------------------------------------------------------

    def delta(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        """The correction added to ``base_out = W0 x + b`` for input ``x (..., in)``."""
        raise AdapterConfigError(f"{type(self).__name__} must implement delta()")

    def delta_weight(self) -> torch.Tensor:
        """Float ``(out, in)`` matrix such that merged ``W = W0 + delta_weight()``."""
        raise AdapterConfigError(f"{type(self).__name__} must implement delta_weight()")

    # -- shared behaviour ------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base_out = self.base(x)
        if self.merged:
            return base_out
        return base_out + self.delta(x, base_out)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters the optimizer updates."""
        return [p for p in self.parameters() if p.requires_grad]

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        """Optimizer parameter groups (one group at ``lr`` unless the method says otherwise)."""
        return [{"params": self.trainable_parameters(), "lr": lr}]

    def extra_loss(self) -> torch.Tensor:
        """Regularizer added to the training loss (none for plain low-rank methods)."""
        return torch.zeros((), device=self.base.weight.device)

    @torch.no_grad()
    def merge(self) -> MergeReport:
        """Fold the adapter into the base weight; the forward then runs the base alone."""
        if self.merged:
            raise AdapterConfigError("adapter is already merged; call unmerge() first")
        delta = self.delta_weight().float()
        exact = base_weight(self.base) + delta
        weight = self.base.weight
        self._saved_base_weight = weight.detach()
        if isinstance(weight, Quantized4bitTensor):
            requantized = quantize_4bit(
                exact.to(weight.dtype), weight.quant_type, weight.blocksize, double_quant=weight.double_quantized
            )
            self.base.weight = nn.Parameter(requantized, requires_grad=False)
        else:
            self.base.weight = nn.Parameter(exact.to(weight.dtype), requires_grad=False)
        error = base_weight(self.base) - exact
        self.merged = True
        norm = delta.norm().item()
        return MergeReport(error.abs().max().item(), error.norm().item() / norm if norm > 0 else 0.0)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the exact base weight saved by :meth:`merge`."""
        if not self.merged or self._saved_base_weight is None:
            raise AdapterConfigError("adapter is not merged")
        self.base.weight = nn.Parameter(self._saved_base_weight, requires_grad=False)
        self._saved_base_weight = None
        self.merged = False

    def extra_repr(self) -> str:
        trainable = sum(p.numel() for p in self.trainable_parameters())
        return f"method={self.config.method}, in={self.in_features}, out={self.out_features}, trainable={trainable}"
