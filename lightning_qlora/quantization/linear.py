"""``Linear4bit``: an ``nn.Linear`` whose frozen weight is a :class:`Quantized4bitTensor`.

Forward: ``y = x @ dequantize(W)^T + b`` in the input's dtype. Decode-size batches (at most
:data:`FUSED_MAX_ROWS` rows, e.g. every generated token; :data:`FUSED_MAX_ROWS_BF16` for bf16
products on a CPU with native bf16) take the fused
``lightning_qlora::linear_4bit`` op, which decodes the 4-bit codes in registers and never writes
the float weight (5-10x faster than dequantize + ``F.linear`` at batch 1); bigger batches
dequantize once and let BLAS multiply. The fused op accumulates in fp32 in another order, so
outputs agree with ``bitsandbytes.nn.Linear4bit`` up to fp32 round-off (the weights themselves
are bit-exact). Backward gives the input gradient
``g @ dequantize(W)`` through ``lightning_qlora::linear_4bit_input_grad`` (the weight is
frozen; adapters train on top), which reads the 4-bit weight tile by tile instead of keeping a
float weight alive between forward and backward -- that is what keeps QLoRA's activation
memory small.

A layer's ``compute_dtype`` (bitsandbytes' ``Linear4bit(compute_dtype=...)``; what
``NF4Precision(compute_dtype="bf16")`` sets on every layer it converts on CPU) makes the dequantize
+ BLAS path multiply in that dtype instead: the input is cast to it, the weight dequantized to it,
the output cast back to the input's dtype, and the input gradient is taken in it as well. It holds
wherever the layer runs -- inside the Trainer and in evaluation or ``generate`` after ``fit``.
:func:`matmul_dtype` overrides it for the layers called inside (``None``: the input's dtype). The
rest of the model (attention, norms, adapters, the residual stream) keeps its own dtype, so no
activation makes fp32 <-> bf16 round trips the way it does under autocast.

The state dict uses bitsandbytes' keys (``weight``, ``weight.absmax``, ``weight.quant_map``,
``weight.nested_absmax``, ``weight.nested_quant_map``,
``weight.quant_state.bitsandbytes__<type>``), so checkpoints load into
``bitsandbytes.nn.Linear4bit`` and back.

Example:
    >>> layer = Linear4bit.from_linear(torch.nn.Linear(128, 64), quant_type="nf4")
    >>> layer(torch.randn(2, 128)).shape
    torch.Size([2, 64])
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from lightning_qlora.ops import op
from lightning_qlora.quantization.bnb_format import from_bnb_state_dict, to_bnb_state_dict
from lightning_qlora.quantization.tensor import Quantized4bitTensor, quantize_4bit


#: Largest batch (rows of ``x`` flattened to 2-D) that takes the fused GEMV; measured crossover
#: with ``python -m lightning_qlora.bench kernels`` (its crossover table), the same limit as the C++ op's.
FUSED_MAX_ROWS = 64

#: The same limit when the layer multiplies in bf16 on a CPU with native bf16 (AVX512-BF16 / AMX):
#: its bf16 BLAS is fast enough that dequantize + GEMM wins from ~8-16 rows on SmolLM2's shapes
#: (2-2.7x faster than the fp32-accumulating fused GEMV at 32-50 rows, the main job's generation
#: batch; measured on an AVX512-BF16 EPYC, see the README). Without native bf16, or in fp32, the
#: crossover stays at :data:`FUSED_MAX_ROWS`.
FUSED_MAX_ROWS_BF16 = 8


#: :func:`matmul_dtype`'s override of each layer's ``compute_dtype``; unset outside it
#: (a plain global, not a ContextVar: torch.compile cannot trace ``ContextVar.get``; process-wide)
_UNSET: Any = object()
_MATMUL_DTYPE: list[Any] = [_UNSET]

#: dtypes a layer can multiply in (``None``: its input's)
COMPUTE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

#: The bf16 input gradient dequantizes the whole weight at once (transiently); bigger weights go
#: tile by tile through the fp32 op instead (the same limit as its one-tile case: 16M values).
_WHOLE_WEIGHT_MAX = 1 << 24


@contextlib.contextmanager
def matmul_dtype(dtype: torch.dtype | None) -> Iterator[None]:
    """4-bit layers called inside multiply in ``dtype`` (``None``: in their input's dtype), outputs in the input's.

    Overrides each layer's own ``compute_dtype`` while the context is open.

    Example:
        >>> layer = Linear4bit.from_linear(torch.nn.Linear(128, 64))
        >>> with matmul_dtype(torch.bfloat16):
        ...     layer(torch.randn(100, 128)).dtype
        torch.float32
    """
    _check_compute_dtype(dtype)
    previous = _MATMUL_DTYPE[0]
    _MATMUL_DTYPE[0] = dtype
    try:
        yield
    finally:
        _MATMUL_DTYPE[0] = previous


def _check_compute_dtype(dtype: Any) -> None:
    if dtype is not None and dtype not in COMPUTE_DTYPES:
        names = ", ".join(str(d) for d in COMPUTE_DTYPES)
        raise ValueError(
            f"compute_dtype={dtype!r} is not a float dtype a 4-bit layer multiplies in; use None, {names}."
        )


def _matmul_dtype(layer_dtype: torch.dtype | None) -> torch.dtype | None:
    override = _MATMUL_DTYPE[0]
    return layer_dtype if override is _UNSET else override


def _weight_args(weight: Quantized4bitTensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, list[int]]:
    """``(packed, absmax, code, blocksize, shape)`` of a 4-bit weight; DQ absmax decoded (tiny)."""
    return weight.packed, weight.block_absmax(), weight.code, weight.blocksize, list(weight.shape)


def _fused_max_rows(x: torch.Tensor, dtype: torch.dtype | None) -> int:
    """Most rows the fused GEMV takes for a product in ``dtype`` (``None``: ``x``'s) on ``x``'s device."""
    if (dtype or x.dtype) != torch.bfloat16 or x.device.type != "cpu":
        return FUSED_MAX_ROWS
    return FUSED_MAX_ROWS_BF16 if _cpu_has_fast_bf16() else FUSED_MAX_ROWS


@functools.cache
def _cpu_has_fast_bf16() -> bool:
    """:func:`lightning_qlora.qlora.cpu_has_fast_bf16`, read once (imported here: qlora imports this module)."""
    from lightning_qlora.qlora import cpu_has_fast_bf16

    return cpu_has_fast_bf16()


def _forward(
    x: torch.Tensor, weight: Quantized4bitTensor, bias: torch.Tensor | None, dtype: torch.dtype | None
) -> torch.Tensor:
    if x.numel() <= _fused_max_rows(x, dtype) * x.shape[-1]:  # the fused GEMV accumulates in fp32 whatever the dtype
        out = op("linear_4bit")(x, *_weight_args(weight))
        return out.add_(bias.to(out.dtype)) if bias is not None else out
    if dtype is None or dtype == x.dtype:
        return torch.nn.functional.linear(x, weight.dequantize(x.dtype), bias)
    cast_bias = bias.to(dtype) if bias is not None else None
    return torch.nn.functional.linear(x.to(dtype), weight.dequantize(dtype), cast_bias).to(x.dtype)


def _input_grad(grad_out: torch.Tensor, weight: Quantized4bitTensor, dtype: torch.dtype | None) -> torch.Tensor:
    if dtype is None or dtype == grad_out.dtype or weight.numel() > _WHOLE_WEIGHT_MAX:
        return op("linear_4bit_input_grad")(grad_out, *_weight_args(weight))
    return torch.matmul(grad_out.to(dtype), weight.dequantize(dtype)).to(grad_out.dtype)


class _Linear4bitFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, weight: Quantized4bitTensor, bias: torch.Tensor | None, dtype: torch.dtype | None
    ) -> torch.Tensor:
        ctx.weight = weight
        ctx.has_bias = bias is not None
        ctx.dtype = dtype
        return _forward(x, weight, bias, dtype)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, None, torch.Tensor | None, None]:
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = _input_grad(grad_out, ctx.weight, ctx.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        return grad_x, None, grad_bias, None


def linear_4bit(
    x: torch.Tensor,
    weight: Quantized4bitTensor,
    bias: torch.Tensor | None = None,
    compute_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``F.linear`` with a 4-bit weight: ``x (..., in) -> (..., out)``, gradients for ``x`` and ``bias``.

    ``compute_dtype``: what the dequantize + BLAS path multiplies in (``None``: ``x``'s dtype);
    :func:`matmul_dtype` overrides it.
    """
    if x.shape[-1] != weight.shape[-1]:
        raise ValueError(
            f"input has {x.shape[-1]} features but the 4-bit weight of shape {tuple(weight.shape)} expects "
            f"{weight.shape[-1]}."
        )
    dtype = _matmul_dtype(compute_dtype)
    if not torch.is_grad_enabled() or not (x.requires_grad or (bias is not None and bias.requires_grad)):
        with torch.no_grad():  # nothing to differentiate (generation): skip the autograd node
            return _forward(x, weight, bias, dtype)
    return _Linear4bitFunction.apply(x, weight, bias, dtype)


class Linear4bit(nn.Module):
    """A linear layer with a frozen 4-bit weight; shapes as ``nn.Linear`` (``(out, in)``).

    ``compute_dtype``: the dtype its matmuls run in (``None``: the input's); see the module docs.
    """

    def __init__(
        self, weight: Quantized4bitTensor, bias: torch.Tensor | None = None, compute_dtype: torch.dtype | None = None
    ) -> None:
        super().__init__()
        if weight.dim() != 2:
            raise ValueError(f"Linear4bit needs a 2-D weight (out_features, in_features), got {tuple(weight.shape)}")
        _check_compute_dtype(compute_dtype)
        self.compute_dtype = compute_dtype
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None
        self.out_features, self.in_features = weight.shape

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        quant_type: str = "nf4",
        blocksize: int = 64,
        double_quant: bool = True,
        check_values: bool = True,
        compute_dtype: torch.dtype | None = None,
    ) -> Linear4bit:
        """Quantize an ``nn.Linear`` (its bias stays float and trainable); see :func:`quantize_4bit` for ``check_values``."""
        _check_compute_dtype(compute_dtype)
        weight = quantize_4bit(
            linear.weight.detach(), quant_type, blocksize, double_quant=double_quant, check_values=check_values
        )
        bias = linear.bias.detach() if linear.bias is not None else None
        return cls(weight, bias, compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear_4bit(x, self.weight, self.bias, self.compute_dtype)

    def _apply(self, fn: Any, recurse: bool = True) -> Linear4bit:
        """``nn.Module._apply`` (``.to``, ``.cpu``, ``.cuda``, ``.float``...) that never swaps the 4-bit weight in place.

        torch moves a tensor subclass parameter with ``torch.utils.swap_tensors``, which refuses a
        tensor with weak references -- and ``torch.profiler(record_shapes=True)`` (Lightning's
        ``PyTorchProfiler``) or any weakref-keyed cache leaves some, so Lightning's teardown
        (``module.cpu()``) failed after such a run. Here a conversion that returns the weight itself
        (``.cpu()`` on the CPU, ``.float()``) leaves it as it is, and any other puts a new
        ``Parameter`` around the converted weight; bias and buffers convert as in ``nn.Module``.
        """
        order = list(self._parameters)
        weight = self._parameters.pop("weight")
        try:
            super()._apply(fn, recurse)
            applied = fn(weight)
            if applied is not weight:
                weight = nn.Parameter(applied, requires_grad=False)
        finally:  # the weight back in its place (parameter order as before)
            rest = dict(self._parameters, weight=weight)
            self._parameters.clear()
            self._parameters.update((name, rest[name]) for name in order)
        return self

    def extra_repr(self) -> str:
        w = self.weight
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"quant_type={w.quant_type}, blocksize={w.blocksize}, double_quant={w.double_quantized}"
            + (f", compute_dtype={self.compute_dtype}" if self.compute_dtype is not None else "")
        )

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        destination.update(to_bnb_state_dict(self.weight, prefix + "weight"))
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        weight_keys = [k for k in state_dict if k == prefix + "weight" or k.startswith(prefix + "weight.")]
        if prefix + "weight" not in state_dict:
            missing_keys.append(prefix + "weight")
        else:
            weight = from_bnb_state_dict({k[len(prefix) :]: state_dict[k] for k in weight_keys}, "weight")
            if weight.shape != self.weight.shape:
                error_msgs.append(
                    f"size mismatch for {prefix}weight: checkpoint has {tuple(weight.shape)}, "
                    f"this layer has {tuple(self.weight.shape)}."
                )
            else:
                self.weight = nn.Parameter(weight.to(self.weight.device), requires_grad=False)
        if self.bias is not None:
            if prefix + "bias" in state_dict:
                with torch.no_grad():
                    self.bias.copy_(state_dict[prefix + "bias"])
            else:
                missing_keys.append(prefix + "bias")
        known = set(weight_keys) | {prefix + "bias"}
        if strict:
            unexpected_keys.extend(
                k for k in state_dict if k.startswith(prefix) and k not in known and "." not in k[len(prefix) :]
            )
