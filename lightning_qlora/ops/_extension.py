"""The compiled C++ kernels (``csrc/``): built on first use, cached, never breaking import.

The CPU kernels for ``quantize_4bit``, ``dequantize_4bit``, the blockwise 8-bit pair (double
quantization of absmax; stochastic 8-bit rounding stays on the reference), ``linear_4bit``,
``linear_4bit_input_grad`` and ``bgmv`` are registered at import as thin Python kernels that validate with
our typed errors, through the one table :data:`CPU_KERNELS` and :func:`~lightning_qlora.ops._backends.register_backend`
(which owns the reference fallback for every device). Loading is lazy, so ``import lightning_qlora`` stays fast: the first op call
compiles ``csrc/cpu`` (ninja, about 30 s on 2 cores) through :mod:`lightning_qlora.ops._build`,
which owns the sources, flags, cache directory (``~/.cache/lightning_qlora/build``) and build
lock; later processes load the cached build in about a second. If the build fails, one
warning is issued and the pure-PyTorch reference kernels keep running. ``LIGHTNING_QLORA_FORCE_REFERENCE=1`` skips the
extension entirely (debugging, and testing the reference path).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from lightning_qlora.errors import (
    BLOCK_SIZES_4BIT,
    BLOCK_SIZES_8BIT,
    check_block_size,
    check_float_dtype,
    check_output_dtype,
)
from lightning_qlora.errors import ShapeMismatchError
from lightning_qlora.ops import reference
from lightning_qlora.ops._backends import register_backend
from lightning_qlora.ops._build import CSRC, FORCE_REFERENCE_ENV, force_reference, reset
from lightning_qlora.ops._build import extension as load_extension
from lightning_qlora.ops.schemas import (
    bgmv_operands,
    check_codebook,
    check_dequantize_4bit_args,
    check_dequantize_8bit_args,
    check_linear_4bit_args,
    check_linear_compact_args,
)

__all__ = ["CSRC", "FORCE_REFERENCE_ENV", "backend", "cpu_extension"]


def _force_reference() -> bool:
    return force_reference()


class _CachedExtension:
    """``cpu_extension()`` with the ``cache_clear()`` of the ``functools.cache`` it used to be."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self) -> Any | None:
        return load_extension(self.name)

    def cache_clear(self) -> None:
        reset(self.name)


#: The compiled CPU module, or ``None`` (with one warning) if it cannot be built (see ops/_build.py).
cpu_extension = _CachedExtension("lightning_qlora_cpu")


def backend() -> str:
    """``"cpp"`` if the compiled CPU kernels are in use, else ``"reference"``."""
    return "reference" if _force_reference() or cpu_extension() is None else "cpp"


def _quantize_4bit(extension: Any, A: torch.Tensor, code: torch.Tensor, blocksize: int, seed: int | None = None) -> Any:
    check_float_dtype(A)
    check_block_size(blocksize, BLOCK_SIZES_4BIT)
    check_codebook(code, 16)
    return extension.quantize_4bit(A, code, blocksize, seed)


def _dequantize_4bit(
    extension: Any,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    blocksize: int,
    shape: Sequence[int],
    dtype: torch.dtype,
) -> torch.Tensor:
    check_output_dtype(dtype)
    check_dequantize_4bit_args(packed, absmax, code, blocksize, shape)
    return extension.dequantize_4bit(packed, absmax, code, blocksize, [int(d) for d in shape], dtype)


def _quantize_blockwise_8bit(
    extension: Any, A: torch.Tensor, code: torch.Tensor, blocksize: int, seed: int | None = None
) -> Any:
    if seed is not None:  # stochastic 8-bit rounding has no compiled kernel
        return reference.quantize_blockwise_8bit(A, code, blocksize, seed)
    check_float_dtype(A)
    check_block_size(blocksize, BLOCK_SIZES_8BIT)
    check_codebook(code, 256)
    return extension.quantize_blockwise_8bit(A, reference.encode_lookup_table_8bit(code), blocksize)


def _dequantize_blockwise_8bit(
    extension: Any,
    codes: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    blocksize: int,
    dtype: torch.dtype,
    offset: torch.Tensor | None = None,
) -> torch.Tensor:
    check_output_dtype(dtype)
    check_dequantize_8bit_args(codes, absmax, code, blocksize, offset)
    return extension.dequantize_blockwise_8bit(codes, absmax, code, blocksize, dtype, offset)


def _linear_4bit(
    extension: Any,
    x: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    blocksize: int,
    shape: Sequence[int],
) -> torch.Tensor:
    check_linear_4bit_args(x, packed, absmax, code, blocksize, shape, features_dim=1)
    return extension.linear_4bit(x, packed, absmax, code, blocksize, [int(d) for d in shape])


def _linear_4bit_input_grad(
    extension: Any,
    grad: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    blocksize: int,
    shape: Sequence[int],
) -> torch.Tensor:
    check_linear_4bit_args(grad, packed, absmax, code, blocksize, shape, features_dim=0)
    return extension.linear_4bit_input_grad(grad, packed, absmax, code, blocksize, [int(d) for d in shape])


def _linear_compact(
    extension: Any, x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, blocksize: int
) -> torch.Tensor:
    check_linear_compact_args(x, weight, scales, blocksize)
    return extension.linear_compact(x, weight, scales, blocksize)


_BGMV_STATUS = {
    1: "an index names no adapter slot (valid: -1 .. slots-1)",
    2: "a rank exceeds the table width",
    3: "a table names a pool row outside the pool (freed pages or stale offsets)",
}


def _bgmv(
    extension: Any,
    x: torch.Tensor,
    pool: torch.Tensor,
    a_rows: torch.Tensor,
    b_rows: torch.Tensor,
    ranks: torch.Tensor,
    scales: torch.Tensor,
    indices: torch.Tensor,
    out_features: int,
) -> torch.Tensor:
    tensors, y = bgmv_operands(x, pool, a_rows, b_rows, ranks, scales, indices, out_features)
    status = extension.bgmv(*tensors, y)
    if status != 0:
        raise ShapeMismatchError(f"bgmv: {_BGMV_STATUS.get(status, f'status {status}')}.")
    return y


#: The CPU registration table: op name -> compiled kernel (validation, then the extension's call).
CPU_KERNELS = {
    "quantize_4bit": _quantize_4bit,
    "dequantize_4bit": _dequantize_4bit,
    "quantize_blockwise_8bit": _quantize_blockwise_8bit,
    "dequantize_blockwise_8bit": _dequantize_blockwise_8bit,
    "linear_4bit": _linear_4bit,
    "linear_4bit_input_grad": _linear_4bit_input_grad,
    "bgmv": _bgmv,
    "linear_compact": _linear_compact,
}
register_backend("cpu", cpu_extension, CPU_KERNELS)
