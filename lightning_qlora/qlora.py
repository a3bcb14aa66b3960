"""Turning a model into a QLoRA model: quantize its Linear layers, add adapters, freeze the rest.

This is the logic behind the ``NF4Precision`` Lightning plugin, kept free of Lightning so it
can be used and tested on its own.

Example:
    >>> spec = QLoRASpec(mode="nf4-dq", adapter=LoRAConfig(r=16))
    >>> report = apply_qlora(model, spec)
    >>> report.quantized[:2], report.adapted[:2]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lightning_qlora.adapters import AdapterConfig, LoRAConfig, find_targets, inject_adapters
from lightning_qlora.errors import (
    BLOCK_SIZES_4BIT,
    ConfigError,
    NonFiniteError,
    QuantizationError,
    check_block_size,
)
from lightning_qlora.quantization.convert import quantize_linears
from lightning_qlora.quantization.linear import Linear4bit

#: mode -> (quant_type, double_quant); "none" = adapters on the float base.
MODES: dict[str, tuple[str, bool] | None] = {
    "nf4": ("nf4", False),
    "nf4-dq": ("nf4", True),
    "fp4": ("fp4", False),
    "fp4-dq": ("fp4", True),
    "none": None,
}
_COMPUTE_DTYPES = {
    "auto": None,
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


class QLoRAConfigError(ConfigError, QuantizationError):
    """A QLoRA setting (mode, compute dtype, targets) is invalid.

    Also a :class:`~lightning_qlora.errors.QuantizationError`, which it was before the package had one error root.
    """


def default_adapter() -> LoRAConfig:
    """The adapter :class:`QLoRASpec` and the plugins use unless told otherwise: LoRA r=16, alpha=32."""
    return LoRAConfig(r=16, alpha=32)


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU does bf16 matmuls natively (AVX512-BF16 or AMX); else fp32 is faster."""
    try:
        with open("/proc/cpuinfo") as handle:
            flags = handle.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_compute_dtype(compute_dtype: str | torch.dtype, device: torch.device | str | None = None) -> torch.dtype:
    """``"auto"``: bf16 on CUDA, bf16 on CPUs with native bf16, otherwise fp32 (~5x faster there)."""
    if isinstance(compute_dtype, torch.dtype):
        return compute_dtype
    if compute_dtype not in _COMPUTE_DTYPES:
        raise QLoRAConfigError(
            f"compute_dtype={compute_dtype!r} is not supported; choose one of {', '.join(_COMPUTE_DTYPES)}."
        )
    chosen = _COMPUTE_DTYPES[compute_dtype]
    if chosen is not None:
        return chosen
    device_type = torch.device(device).type if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    if device_type == "cuda" or (device_type == "cpu" and cpu_has_fast_bf16()):
        return torch.bfloat16
    return torch.float32


@dataclass(frozen=True)
class QLoRASpec:
    """What :func:`apply_qlora` does to a model.

    Attributes:
        mode: ``"nf4"``, ``"nf4-dq"`` (QLoRA), ``"fp4"``, ``"fp4-dq"`` or ``"none"`` (plain LoRA on a float base).
        blocksize: elements per absmax block (32..4096).
        adapter: any adapter config from :mod:`lightning_qlora.adapters` (default: :func:`default_adapter`),
            or ``None`` to quantize and freeze only (as Lightning's ``BitsandbytesPrecision`` does).
        target_modules: which Linear layers get adapters (names, globs, ``re:...`` or ``"all-linear"``).
        skip_modules: layers neither quantized nor adapted (the output head is sensitive).
    """

    mode: str = "nf4-dq"
    blocksize: int = 64
    adapter: AdapterConfig | None = field(default_factory=default_adapter)
    target_modules: str | Sequence[str] = "all-linear"
    skip_modules: Sequence[str] = ("lm_head",)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise QLoRAConfigError(f"mode={self.mode!r} is not a QLoRA mode; choose one of {', '.join(MODES)}.")
        check_block_size(self.blocksize, BLOCK_SIZES_4BIT)
        if self.adapter is not None and not isinstance(self.adapter, AdapterConfig):
            raise QLoRAConfigError(
                f"adapter={self.adapter!r} is not an adapter config; use e.g. lightning_qlora.adapters.LoRAConfig(r=16), "
                "or adapter=None to quantize and freeze only."
            )
        if isinstance(self.skip_modules, str):
            raise QLoRAConfigError(f"skip_modules={self.skip_modules!r} must be a list of names, e.g. ['lm_head'].")


@dataclass(frozen=True)
class QLoRAReport:
    """Names of the layers :func:`apply_qlora` quantized and adapted."""

    quantized: list[str]
    adapted: list[str]


def _skipped(name: str, skip: Sequence[str]) -> bool:
    return any(name == s or name.endswith("." + s) for s in skip)


def _check_existing_4bit(model: nn.Module, spec: QLoRASpec) -> None:
    """A model that arrives 4-bit already (e.g. from ``load_causal_lm``) must be in the spec's format."""
    formats = MODES[spec.mode]
    for name, module in model.named_modules():
        if not isinstance(module, Linear4bit) or formats is None:
            continue
        weight = module.weight
        here = (weight.quant_type, weight.double_quantized)
        if here != formats or weight.blocksize != spec.blocksize:
            found = f"{weight.quant_type}{'-dq' if weight.double_quantized else ''}"
            raise QLoRAConfigError(
                f"layer {name!r} is already 4-bit as {found} (blocksize {weight.blocksize}) but mode={spec.mode!r}, "
                f"blocksize={spec.blocksize}; pass mode={found!r}, blocksize={weight.blocksize} to use the model as "
                "it is."
            )


def _contiguous_input(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    """Forward pre-hook: a non-contiguous input becomes contiguous before an ``nn.Linear`` multiplies it.

    ``torch.matmul`` of a non-contiguous 3-D input -- the ``hidden[:, -1:, :]`` slice transformers
    hands the ``lm_head`` in the first step of ``generate`` -- expands the weight across the batch
    into a batched product: for SmolLM2's 49152x576 head and 50 prompts, 266 ms instead of 33 ms
    for a contiguous copy of the (50, 1, 576) slice (torch 2.13, this machine).
    """
    if args and isinstance(args[0], torch.Tensor) and args[0].dim() > 2 and not args[0].is_contiguous():
        return (args[0].contiguous(), *args[1:])
    return None


def _make_float_inputs_contiguous(model: nn.Module, skip: Sequence[str]) -> None:
    """The :func:`_contiguous_input` hook on every float ``nn.Linear`` left out of the conversion (``lm_head``)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and _skipped(name, skip) and not getattr(module, "_lq_contiguous_input", False):
            module.register_forward_pre_hook(_contiguous_input)
            module._lq_contiguous_input = True


def apply_qlora(model: nn.Module, spec: QLoRASpec) -> QLoRAReport:
    """Quantize (layer by layer), inject adapters and freeze everything else, in place.

    Everything that can fail is checked before the model is touched -- the targets, layers
    that are 4-bit already -- and a NaN/Inf weight, found by the quantize kernel's own pass,
    names its layer and puts back the layers converted so far: on an error the model is
    exactly as it was. Layers already 4-bit are kept (only adapters are added).
    """
    linears = [name for name, module in model.named_modules() if isinstance(module, (nn.Linear, Linear4bit))]
    if not linears:
        raise QLoRAConfigError(f"{type(model).__name__} has no nn.Linear layer: there is nothing to quantize or adapt.")
    _check_existing_4bit(model, spec)
    formats = MODES[spec.mode]
    to_quantize = (
        []
        if formats is None
        else [
            name
            for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and not _skipped(name, spec.skip_modules)
        ]
    )
    if spec.adapter is not None:
        find_targets(model, spec.target_modules, exclude=spec.skip_modules)  # raises on a target that matches nothing
    quantized: list[str] = []
    if formats is not None:
        quant_type, double_quant = formats
        try:  # the NaN/Inf check rides on the quantize kernel; a failure puts every layer back
            quantized = quantize_linears(model, quant_type, spec.blocksize, double_quant, skip=spec.skip_modules)
        except NonFiniteError as error:
            name = next((n for n in to_quantize if str(error).startswith(f"{n}.weight ")), "")
            raise NonFiniteError(
                f"{error} Fix that layer's weights, or leave it in float with "
                f"skip_modules=[..., {name.rpartition('.')[2]!r}]."
            ) from None
    _make_float_inputs_contiguous(model, spec.skip_modules)
    if spec.adapter is None:
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        return QLoRAReport(quantized, [])
    adapted = inject_adapters(model, spec.adapter, spec.target_modules, exclude=spec.skip_modules)
    return QLoRAReport(quantized, adapted)
