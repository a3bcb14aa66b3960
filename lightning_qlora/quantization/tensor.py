"""``Quantized4bitTensor``: a frozen 4-bit weight that still looks like a tensor.

A tensor subclass (in the style of torchao's NF4 tensor) whose logical shape and dtype are
those of the original weight while its storage is the packed 4-bit codes plus absmax
constants (optionally double-quantized). Being a tensor keeps ``nn.Parameter``,
``state_dict``, ``.to(device)``, ``torch.compile`` (flatten/unflatten) and FSDP-style
traversal working. Supported aten ops are listed in one table (:data:`_ATEN_HANDLERS`);
anything else raises an error naming the op. ``F.linear`` with this tensor as the weight
dequantizes on the fly.

Example:
    >>> w = torch.randn(256, 128)
    >>> q = quantize_4bit(w, "nf4", blocksize=64, double_quant=True)
    >>> q.shape, q.dtype
    (torch.Size([256, 128]), torch.float32)
    >>> (q.dequantize() - w).abs().max() < 0.2 * w.abs().max()
    tensor(True)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from lightning_qlora.errors import BLOCK_SIZES_8BIT, LightningQLoRAError, check_block_size, check_output_dtype
from lightning_qlora.ops import op
from lightning_qlora.ops.schemas import check_dequantize_4bit_args
from lightning_qlora.quantization.codebooks import get_codebook
from lightning_qlora.quantization.functional import (
    NESTED_BLOCKSIZE,
    NestedAbsmax,
    double_quantize_absmax,
    quantize_4bit_raw,
)

aten = torch.ops.aten


class UnsupportedOperationError(LightningQLoRAError, NotImplementedError):
    """An operation was applied to a quantized tensor that has no quantized meaning."""


class Quantized4bitTensor(torch.Tensor):
    """A weight stored in 4 bits per element (NF4/FP4/INT4, blockwise absmax, optional DQ).

    Attributes:
        packed: uint8 ``(ceil(numel / 2),)``, two codes per byte, first element high nibble.
        absmax: float32 ``(num_blocks,)`` -- or ``None`` when double-quantized.
        nested: the double-quantized absmax (:class:`NestedAbsmax`) or ``None``.
        code: float32 ``(16,)`` codebook, index = 4-bit code.
        quant_type: ``"nf4"``, ``"fp4"`` or ``"int4"``.
        blocksize: elements per absmax block.
    """

    packed: torch.Tensor
    absmax: torch.Tensor | None
    nested: NestedAbsmax | None
    code: torch.Tensor
    quant_type: str
    blocksize: int

    @staticmethod
    def __new__(
        cls,
        packed: torch.Tensor,
        absmax: torch.Tensor | None,
        nested: NestedAbsmax | None,
        code: torch.Tensor,
        quant_type: str,
        blocksize: int,
        shape: torch.Size | tuple[int, ...],
        dtype: torch.dtype,
    ) -> Quantized4bitTensor:
        return torch.Tensor._make_wrapper_subclass(
            cls, torch.Size(shape), dtype=dtype, device=packed.device, requires_grad=False
        )

    def __init__(
        self,
        packed: torch.Tensor,
        absmax: torch.Tensor | None,
        nested: NestedAbsmax | None,
        code: torch.Tensor,
        quant_type: str,
        blocksize: int,
        shape: torch.Size | tuple[int, ...],
        dtype: torch.dtype,
    ) -> None:
        if (absmax is None) == (nested is None):
            raise ValueError("exactly one of absmax (plain) or nested (double-quantized) must be given")
        check_output_dtype(dtype)
        self.packed = packed
        self.absmax = absmax
        self.nested = nested
        self.code = code
        self.quant_type = quant_type
        self.blocksize = blocksize
        blocks = nested.codes if nested is not None else absmax
        check_dequantize_4bit_args(packed, blocks.float(), code, blocksize, tuple(shape))

    # -- what users call ---------------------------------------------------------------

    @property
    def double_quantized(self) -> bool:
        """Whether the absmax constants are stored in 8 bits (QLoRA's double quantization)."""
        return self.nested is not None

    def block_absmax(self) -> torch.Tensor:
        """float32 absmax per block (dequantized first when double-quantized)."""
        return self.nested.dequantize() if self.nested is not None else self.absmax

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The float weight, shape ``self.shape``, in ``dtype`` (default: the original dtype)."""
        dtype = self.dtype if dtype is None else dtype
        check_output_dtype(dtype)
        return op("dequantize_4bit")(
            self.packed, self.block_absmax(), self.code, self.blocksize, list(self.shape), dtype
        )

    def storage_nbytes(self) -> int:
        """Exact bytes held: packed codes, absmax (or its 8-bit codes, nested absmax, offset), codebooks."""
        total = self.packed.numel() + self.code.numel() * 4
        if self.nested is None:
            return total + self.absmax.numel() * 4
        nested = self.nested
        return total + nested.codes.numel() + nested.nested_absmax.numel() * 4 + 4 + nested.code.numel() * 4

    def bits_per_param(self) -> float:
        """Storage bits per weight element, everything included (NF4+DQ at 64/256: 4.127)."""
        return self.storage_nbytes() * 8 / self.numel()

    def __repr__(self) -> str:  # type: ignore[override]
        dq = ", double_quant" if self.double_quantized else ""
        return (
            f"Quantized4bitTensor(shape={tuple(self.shape)}, dtype={self.dtype}, quant_type={self.quant_type!r}, "
            f"blocksize={self.blocksize}{dq}, device={self.device})"
        )

    # -- tensor-subclass protocol -----------------------------------------------------

    def __tensor_flatten__(self) -> tuple[list[str], dict[str, Any]]:
        names = ["packed", "code"]
        if self.nested is None:
            names.append("absmax")
        else:
            self.nested_codes, self.nested_absmax, self.nested_code, self.nested_offset = (
                self.nested.codes,
                self.nested.nested_absmax,
                self.nested.code,
                self.nested.offset,
            )
            names += ["nested_codes", "nested_absmax", "nested_code", "nested_offset"]
        meta = {
            "quant_type": self.quant_type,
            "blocksize": self.blocksize,
            "nested_blocksize": self.nested.blocksize if self.nested is not None else None,
            "shape": tuple(self.shape),
            "dtype": self.dtype,
        }
        return names, meta

    @staticmethod
    def __tensor_unflatten__(
        inner: dict[str, torch.Tensor], meta: dict[str, Any], outer_size: Any, outer_stride: Any
    ) -> Quantized4bitTensor:
        nested = None
        if meta["nested_blocksize"] is not None:
            nested = NestedAbsmax(
                inner["nested_codes"],
                inner["nested_absmax"],
                inner["nested_code"],
                inner["nested_offset"],
                meta["nested_blocksize"],
            )
        return Quantized4bitTensor(
            inner["packed"],
            inner.get("absmax"),
            nested,
            inner["code"],
            meta["quant_type"],
            meta["blocksize"],
            meta["shape"],
            meta["dtype"],
        )

    def _with(
        self, fn: Callable[[torch.Tensor], torch.Tensor], dtype: torch.dtype | None = None
    ) -> Quantized4bitTensor:
        """A new tensor whose storage tensors are ``fn(t)`` (e.g. moved or cloned)."""
        nested = None
        if self.nested is not None:
            n = self.nested
            nested = NestedAbsmax(fn(n.codes), fn(n.nested_absmax), fn(n.code), fn(n.offset), n.blocksize)
        absmax = fn(self.absmax) if self.absmax is not None else None
        return Quantized4bitTensor(
            fn(self.packed),
            absmax,
            nested,
            fn(self.code),
            self.quant_type,
            self.blocksize,
            self.shape,
            dtype or self.dtype,
        )

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        handler = _ATEN_HANDLERS.get(func)
        if handler is None:
            raise UnsupportedOperationError(
                f"{func} is not supported on a Quantized4bitTensor (it holds 4-bit codes, not floats). "
                "Call .dequantize() first, or use it as a Linear weight."
            )
        return handler(*args, **(kwargs or {}))

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is torch.nn.functional.linear:
            from lightning_qlora.quantization.linear import linear_4bit

            return linear_4bit(*args, **kwargs)
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)


def _detach(t: Quantized4bitTensor) -> Quantized4bitTensor:
    return t._with(lambda x: x)


def _clone(t: Quantized4bitTensor, memory_format: Any = None) -> Quantized4bitTensor:
    return t._with(torch.clone)


def _to_copy(t: Quantized4bitTensor, *, dtype: torch.dtype | None = None, device: Any = None, **_: Any) -> Any:
    # A dtype change only changes what dequantize() returns by default: the codes stay 4-bit.
    return t._with(lambda x: x.to(device) if device is not None else x, dtype=dtype)


def _copy_(dst: Quantized4bitTensor, src: Quantized4bitTensor, non_blocking: bool = False) -> Quantized4bitTensor:
    if not isinstance(src, Quantized4bitTensor) or src.shape != dst.shape or src.blocksize != dst.blocksize:
        raise UnsupportedOperationError(
            "copy_ into a Quantized4bitTensor needs another Quantized4bitTensor of the same shape and blocksize; "
            f"got {type(src).__name__} of shape {tuple(src.shape)}."
        )
    for name in ("packed", "absmax", "code"):
        target = getattr(dst, name)
        if target is not None:
            target.copy_(getattr(src, name))
    if dst.nested is not None:
        for name in ("codes", "nested_absmax", "code", "offset"):
            getattr(dst.nested, name).copy_(getattr(src.nested, name))
    return dst


def _is_same_size(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape


_ATEN_HANDLERS: dict[Any, Callable[..., Any]] = {
    aten.detach.default: _detach,
    aten.alias.default: _detach,
    aten.clone.default: _clone,
    aten._to_copy.default: _to_copy,
    aten.copy_.default: _copy_,
    aten.is_same_size.default: _is_same_size,
}


def quantize_4bit(
    weight: torch.Tensor,
    quant_type: str = "nf4",
    blocksize: int = 64,
    *,
    double_quant: bool = True,
    nested_blocksize: int = NESTED_BLOCKSIZE,
    seed: int | None = None,
    check_values: bool = True,
) -> Quantized4bitTensor:
    """Quantize ``weight`` to a :class:`Quantized4bitTensor` (bit-exact with bitsandbytes).

    Args:
        weight: fp32/fp16/bf16 tensor of any shape and numel (a last partial block is fine).
        quant_type: ``"nf4"`` (QLoRA), ``"fp4"`` or ``"int4"`` (symmetric baseline).
        blocksize: elements per absmax block, a power of two from 32 to 4096.
        double_quant: store absmax in 8 bits around its mean (saves ~0.37 bits/param at 64).
        nested_blocksize: block size of the double quantization (bitsandbytes uses 256).
        seed: stochastic rounding with this seed (unbiased in expectation); ``None`` = nearest.
        check_values: refuse NaN/Inf (:class:`~lightning_qlora.errors.NonFiniteError`). With
            ``False`` a non-finite block dequantizes to NaN -- never to a plausible number.

    Returns:
        The quantized weight; ``.dequantize()`` gives it back in its original dtype.
    """
    weight = weight.detach()
    packed, absmax = quantize_4bit_raw(weight, quant_type, blocksize, seed=seed, check_values=check_values)
    code = get_codebook(quant_type, weight.device)
    nested = None
    if double_quant:
        check_block_size(nested_blocksize, BLOCK_SIZES_8BIT)
        nested = double_quantize_absmax(absmax, nested_blocksize)
        absmax = None
    return Quantized4bitTensor(packed, absmax, nested, code, quant_type, blocksize, weight.shape, weight.dtype)


def dequantize_4bit(tensor: Quantized4bitTensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Functional form of :meth:`Quantized4bitTensor.dequantize`."""
    return tensor.dequantize(dtype)


__all__ = ["Quantized4bitTensor", "UnsupportedOperationError", "dequantize_4bit", "quantize_4bit"]
