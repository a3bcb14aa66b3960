"""Blockwise 4-bit and 8-bit quantization with double quantization of the absmax constants.

QLoRA (https://arxiv.org/abs/2305.14314) stores a weight ``W`` (any shape, ``n`` elements)
as, per block ``b`` of ``blocksize`` consecutive elements of the flattened weight::

    absmax_b = max_i |W_i|                       # float32, one per block
    q_i      = nearest(codebook, W_i / absmax_b) # 4-bit index, two per byte
    W_i     ~= codebook[q_i] * absmax_b

Double quantization (DQ) stores the absmax constants themselves in 8 bits::

    offset        = mean(absmax)                                    # float32 scalar
    qabsmax, c2   = quantize_blockwise_8bit(absmax - offset, 256)   # dynamic 8-bit map
    absmax       ~= dynamic[qabsmax] * c2[b // 256] + offset

The results are bit-identical to bitsandbytes 0.50 (``quantize_4bit`` with
``compress_statistics=True``). These functions validate their input and raise the typed
errors of :mod:`lightning_qlora.errors`; the ops they call do not.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lightning_qlora.errors import (
    BLOCK_SIZES_4BIT,
    BLOCK_SIZES_8BIT,
    UnknownQuantTypeError,
    check_block_size,
    check_finite,
    check_float_dtype,
    check_not_empty,
)
from lightning_qlora.ops import op
from lightning_qlora.quantization.codebooks import get_codebook

#: 4-bit quantization types accepted by :func:`quantize_4bit`.
QUANT_TYPES_4BIT: tuple[str, ...] = ("nf4", "fp4", "int4")
#: Block size of the nested (double) quantization, as in bitsandbytes.
NESTED_BLOCKSIZE = 256


@dataclass(frozen=True)
class NestedAbsmax:
    """Double-quantized absmax constants: ``dynamic[codes] * nested_absmax[b // blocksize] + offset``."""

    codes: torch.Tensor  # uint8, one per 4-bit block
    nested_absmax: torch.Tensor  # float32, one per nested block
    code: torch.Tensor  # float32, the 256-entry dynamic map
    offset: torch.Tensor  # float32 scalar
    blocksize: int = NESTED_BLOCKSIZE

    def dequantize(self) -> torch.Tensor:
        """The float32 absmax constants (bit-exact with bitsandbytes)."""
        # one pass, offset included (a separate torch add cost as much again and ran its own thread team)
        return op("dequantize_blockwise_8bit")(
            self.codes, self.nested_absmax, self.code, self.blocksize, torch.float32, self.offset
        )

    def to(self, device: torch.device | str) -> NestedAbsmax:
        """A copy on ``device``."""
        return NestedAbsmax(
            self.codes.to(device),
            self.nested_absmax.to(device),
            self.code.to(device),
            self.offset.to(device),
            self.blocksize,
        )


def _check_seed(seed: int | None) -> None:
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise UnknownQuantTypeError(f"seed={seed!r} must be a non-negative int (or None for nearest rounding).")


def validate_quant_type(quant_type: str) -> None:
    """Raise :class:`UnknownQuantTypeError` unless ``quant_type`` is a 4-bit type we pack."""
    if quant_type not in QUANT_TYPES_4BIT:
        raise UnknownQuantTypeError(
            f"quant_type={quant_type!r} is not a 4-bit type; choose one of {', '.join(QUANT_TYPES_4BIT)}."
        )


def quantize_blockwise_8bit(
    tensor: torch.Tensor,
    blocksize: int = 4096,
    code: str | torch.Tensor = "dynamic8",
    *,
    seed: int | None = None,
    check_values: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``tensor`` blockwise to 8-bit indices into a 256-entry sorted codebook.

    Args:
        tensor: fp32/fp16/bf16, any shape.
        blocksize: elements per absmax block, a power of two in 32..4096.
        code: codebook name (``"dynamic8"``, ``"int8"``) or a sorted float32 tensor of 256 values.
        seed: if given, stochastic rounding with this seed (unbiased); else nearest.
        check_values: reject NaN/Inf (see :class:`~lightning_qlora.errors.NonFiniteError`).

    Returns:
        ``(codes, absmax)``: uint8 of ``tensor``'s shape, float32 of ``ceil(numel / blocksize)``.
    """
    check_float_dtype(tensor)
    check_not_empty(tensor)
    check_block_size(blocksize, BLOCK_SIZES_8BIT)
    _check_seed(seed)
    if check_values:
        check_finite(tensor)
    table = get_codebook(code, tensor.device) if isinstance(code, str) else code
    return op("quantize_blockwise_8bit")(tensor, table, blocksize, seed)


def dequantize_blockwise_8bit(
    codes: torch.Tensor,
    absmax: torch.Tensor,
    blocksize: int = 4096,
    code: str | torch.Tensor = "dynamic8",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Inverse of :func:`quantize_blockwise_8bit`: ``code[codes] * absmax[block]`` cast to ``dtype``."""
    table = get_codebook(code, codes.device) if isinstance(code, str) else code
    return op("dequantize_blockwise_8bit")(codes, absmax, table, blocksize, dtype)


def double_quantize_absmax(absmax: torch.Tensor, blocksize: int = NESTED_BLOCKSIZE) -> NestedAbsmax:
    """Quantize absmax constants to 8 bits around their mean (QLoRA's double quantization)."""
    offset = absmax.mean()
    code = get_codebook("dynamic8", absmax.device)
    codes, nested = op("quantize_blockwise_8bit")(absmax - offset, code, blocksize, None)
    return NestedAbsmax(codes, nested, code, offset, blocksize)


def quantize_4bit_raw(
    tensor: torch.Tensor,
    quant_type: str = "nf4",
    blocksize: int = 64,
    *,
    seed: int | None = None,
    check_values: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validated call of the 4-bit op: returns ``(packed uint8, absmax float32)``.

    Most users want :func:`lightning_qlora.quantization.quantize_4bit`, which wraps the result
    (and the optional double quantization) in a :class:`Quantized4bitTensor`.
    """
    check_float_dtype(tensor)
    check_not_empty(tensor)
    check_block_size(blocksize, BLOCK_SIZES_4BIT)
    validate_quant_type(quant_type)
    _check_seed(seed)
    packed, absmax = op("quantize_4bit")(tensor, get_codebook(quant_type, tensor.device), blocksize, seed)
    # The NaN/Inf check rides on the kernel's own pass: a block's absmax is non-finite exactly
    # when the block holds a NaN or Inf (NaN propagates), so one reduction over the absmax
    # (1/blocksize of the weight) replaces a second pass over the weight.
    if check_values and not bool(torch.isfinite(absmax.amax())):
        check_finite(tensor)  # only on failure: names the count and the first bad element
    return packed, absmax
