"""The interface every adapter implements, and the thin base classes they share.

An adapter wraps one frozen base layer ``W0`` (an ``nn.Linear`` or a 4-bit
:class:`~lightning_qlora.quantization.Linear4bit`) and adds a trainable correction:
``h = W0 x + delta(x)``. A method is one :class:`AdapterConfig` subclass (its settings, with
``build(base)``) and one :class:`AdapterLayer` subclass, which implements :meth:`AdapterLayer.delta`
(and :meth:`AdapterLayer.delta_weight` for merging). Everything else is shared, and what a method
*can* do is asked of its layer through capability hooks whose defaults refuse or do nothing:

======================================  ==========================================================
hook                                    default
======================================  ==========================================================
``trainable_parameters()``              the layer's parameters that require grad
``param_groups(lr)``                    one group at ``lr`` (LoRA+ splits A and B)
``extra_loss()``                        ``None`` (AdaLoRA's orthogonality, a mixture's load balancing)
``after_optimizer_step()``              nothing (Delta-LoRA moves its base)
``on_inject(model)``                    nothing (LoRA-drop registers its load hook)
``adapter_state_dict()``                the layer's tensors without the frozen base
``model_state(model)``                  nothing (LoRA-drop's shared adapters live on the model)
``prepare_load(model, name, tensors)``  nothing (VeRA adopts saved projections)
``peft_state(name)``                    :class:`CapabilityError`: no PEFT equivalent
``lora_factors()``                      :class:`CapabilityError`: not a ``scale * B A`` update
``merge()`` / ``unmerge()``             fold ``delta_weight()`` into the base and back
======================================  ==========================================================

The generic code (injection, saving, PEFT export, merging, serving, the Lightning plugin) only
calls these hooks; it never tests a layer's class or method name. Adding a method is therefore
one file here, one YAML in ``conf/adapter/`` and its test.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from lightning_qlora.errors import ConfigError, LightningQLoRAError
from lightning_qlora.quantization.linear import Linear4bit
from lightning_qlora.quantization.tensor import Quantized4bitTensor, quantize_4bit


class AdapterConfigError(ConfigError):
    """An adapter configuration or adapter file is invalid for the layer it targets."""


class CapabilityError(AdapterConfigError):
    """The adapter method cannot do what was asked (export to PEFT, serve as LoRA factors, merge...)."""


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


@dataclass(frozen=True)
class LoRAFactors:
    """A layer's update written as ``delta(x) = scale * x @ A^T @ B^T`` (what batched LoRA serving runs).

    Attributes:
        lora_A: ``(r, in)`` float32.
        lora_B: ``(out, r)`` float32.
        scale: the scalar in front of ``B A``.
    """

    lora_A: torch.Tensor
    lora_B: torch.Tensor
    scale: float

    @property
    def rank(self) -> int:
        return self.lora_A.shape[0]


@dataclass(frozen=True)
class PeftState:
    """What one layer contributes to a PEFT adapter directory.

    Attributes:
        config: fields of PEFT's ``adapter_config.json`` this layer implies (``peft_type``, ``r``...);
            all layers of an export must agree on them, except the per-module ``rank_pattern`` /
            ``alpha_pattern`` dicts, which are merged.
        tensors: the layer's tensors keyed by PEFT's name relative to the layer (``lora_A.weight``...).
        shared: adapter-wide tensors keyed from ``base_model.`` (VeRA's projections); when layers give
            different sizes of one, the largest is kept and the others must be its leading slices.
    """

    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    shared: dict[str, torch.Tensor] = field(default_factory=dict)


def check_positive_int(method: str, name: str, value: object, hint: str = "") -> None:
    """Raise :class:`AdapterConfigError` unless ``value`` is a positive ``int`` (bools excluded)."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise AdapterConfigError(f"{method}: {name}={value!r} must be a positive integer{hint}.")


@dataclass(frozen=True, kw_only=True)
class AdapterConfig:
    """Settings every adapter method shares, validated at construction.

    Subclasses add their own fields, set ``method`` (the name used in configs and saved files)
    and ``layer_class``, and may extend ``__post_init__`` (calling ``super().__post_init__()``).
    Fields are keyword-only, so a subclass can add fields without shifting positions.

    Attributes:
        r: rank of the update (VeRA: of the shared random projections).
        dropout: dropout probability on the adapter's input, in ``[0, 1)``.
    """

    r: int = 8
    dropout: float = 0.0
    method: ClassVar[str] = ""
    layer_class: ClassVar[type[AdapterLayer]]

    def __post_init__(self) -> None:
        check_positive_int(self.method, "r", self.r, " (typical: 4..64)")
        if (
            isinstance(self.dropout, bool)
            or not isinstance(self.dropout, (int, float))
            or not 0.0 <= self.dropout < 1.0
        ):
            raise AdapterConfigError(f"{self.method}: dropout={self.dropout!r} must be a number in [0, 1), e.g. 0.05.")
        alpha = getattr(self, "alpha", None)  # the scaled methods (not VeRA, which has no alpha) declare it
        if alpha is not None and (
            isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha)
        ):
            raise AdapterConfigError(f"{self.method}: alpha={alpha!r} must be a finite number (typical: 2 * r).")

    def build(self, base: nn.Module) -> AdapterLayer:
        """Wrap ``base`` (an ``nn.Linear`` or ``Linear4bit``) with this method's adapter."""
        return self.layer_class(base, self)

    def lora_factors_from_state(self, name: str, tensors: Mapping[str, torch.Tensor]) -> LoRAFactors:
        """Layer ``name``'s update as ``scale * B A`` from saved ``tensors`` (keyed as our adapter files are).

        What serving asks of a method to batch it without building the layers; the default refuses.
        """
        raise CapabilityError(
            f"{self.method!r} adapters are not a plain scale * B A update, so they cannot be served as LoRA; merge "
            "them into the base (lightning_qlora.adapters.export_merged) to serve the result."
        )

    def with_rank(self, r: int) -> AdapterConfig:
        """This config at another rank (used to clamp a rank above a small layer's size)."""
        from dataclasses import replace

        return replace(self, r=r)


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

    def __init__(self, base: nn.Module, config: AdapterConfig) -> None:
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
        raise CapabilityError(f"{type(self).__name__} must implement delta()")

    def delta_weight(self) -> torch.Tensor:
        """Float ``(out, in)`` matrix such that merged ``W = W0 + delta_weight()``."""
        raise CapabilityError(f"{type(self).__name__} must implement delta_weight()")

    # -- capability hooks (defaults: refuse or do nothing) ---------------------------------

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters the optimizer updates."""
        return [p for p in self.parameters() if p.requires_grad]

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        """Optimizer parameter groups (one group at ``lr`` unless the method says otherwise)."""
        return [{"params": self.trainable_parameters(), "lr": lr}]

    def extra_loss(self) -> torch.Tensor | None:
        """Regularizer added to the training loss, or ``None`` when the method has none."""
        return None

    def after_optimizer_step(self) -> bool:
        """Per-step work after each optimizer step (the plugin calls it); returns whether anything changed."""
        return False

    def on_inject(self, model: nn.Module) -> None:
        """Called once per layer after injection into ``model`` (e.g. to register model-level hooks)."""

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """The tensors that make this adapter, keyed relative to the layer (the frozen base left out)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("base.") and isinstance(v, torch.Tensor)}

    def model_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Tensors held on ``model`` (not in this layer) that this adapter uses, keyed from the model root."""
        return {}

    def prepare_load(self, model: nn.Module, name: str, tensors: dict[str, torch.Tensor]) -> None:
        """Adjust the structure before ``tensors`` (keyed from the model root; this layer is ``name``) are loaded."""

    def peft_state(self, name: str) -> PeftState:
        """This layer in PEFT's layout, or :class:`CapabilityError` if PEFT has no such method."""
        raise CapabilityError(
            f"{self.config.method!r} adapters have no PEFT equivalent, so they cannot be exported to PEFT's layout; "
            "save them with lightning_qlora.adapters.save_adapters, or ship a merged float model with "
            "lightning_qlora.adapters.export_merged."
        )

    def lora_factors(self) -> LoRAFactors:
        """The update as ``scale * B A`` factors, or :class:`CapabilityError` if it is not one."""
        raise CapabilityError(
            f"{self.config.method!r} adapters are not a plain scale * B A update, so they cannot be served as LoRA; "
            "merge them into the base (lightning_qlora.adapters.export_merged) to serve the result."
        )

    # -- shared behaviour ------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base_out = self.base(x)
        if self.merged:
            return base_out
        return base_out + self.delta(x, base_out)

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


__all__ = [
    "AdapterConfig",
    "AdapterConfigError",
    "AdapterLayer",
    "CapabilityError",
    "LightningQLoRAError",
    "LoRAFactors",
    "MergeReport",
    "PeftState",
    "base_weight",
    "check_positive_int",
    "in_out_features",
]
