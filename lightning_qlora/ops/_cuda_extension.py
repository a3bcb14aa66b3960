"""The compiled CUDA kernels (``csrc/cuda``): built on first use on a CUDA machine, registered for ``cuda``.

Like the CPU kernels, these are built with ``torch.utils.cpp_extension.load`` the first time an
op runs on a CUDA tensor (nvcc needed), cached, and fall back to the reference kernels with one
warning if the build fails; ``LIGHTNING_QLORA_FORCE_REFERENCE=1`` forces the reference path.
Each kernel of the table :data:`CUDA_KERNELS` validates with the same typed errors as the CPU
path, selects the tensor's device and passes the current stream to the launchers;
:func:`~lightning_qlora.ops._backends.register_backend` adds the reference fallback.

Verified here only by compilation (``make cuda-check`` compiles every ``.cu`` file and
``csrc/cuda/bindings.cpp`` with nvcc): the machines this is developed on have no GPU, so none
of this has run.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from lightning_qlora.errors import BLOCK_SIZES_4BIT, check_block_size, check_float_dtype, check_output_dtype
from lightning_qlora.ops._backends import register_backend
from lightning_qlora.ops._build import CSRC, EXTENSIONS  # noqa: F401 -- CSRC: where the sources are, for the tests
from lightning_qlora.ops._extension import _CachedExtension
from lightning_qlora.ops.schemas import (
    bgmv_operands,
    check_codebook,
    check_dequantize_4bit_args,
    check_linear_4bit_args,
)

#: The CUDA extension's sources under csrc/cuda (the list lives in ops/_build.py).
SOURCES = tuple(Path(source).name for source in EXTENSIONS["lightning_qlora_cuda"]["sources"])


class _CudaExtension(_CachedExtension):
    """Built only where CUDA is available; elsewhere ``None`` without a warning."""

    def __call__(self) -> Any | None:
        return super().__call__() if torch.cuda.is_available() else None


#: The compiled CUDA module, or ``None`` (with one warning if a build failed) where it cannot be built.
cuda_extension = _CudaExtension("lightning_qlora_cuda")


def _stream(tensor: torch.Tensor) -> int:
    return torch.cuda.current_stream(tensor.device).cuda_stream


def _quantize_4bit(extension: Any, A: torch.Tensor, code: torch.Tensor, blocksize: int, seed: int | None = None) -> Any:
    check_float_dtype(A)
    check_block_size(blocksize, BLOCK_SIZES_4BIT)
    check_codebook(code, 16)
    with torch.cuda.device(A.device):
        return extension.quantize_4bit(A, code, blocksize, seed, _stream(A))


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
    with torch.cuda.device(packed.device):
        return extension.dequantize_4bit(
            packed, absmax, code, blocksize, [int(d) for d in shape], dtype, _stream(packed)
        )


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
    with torch.cuda.device(x.device):
        return extension.linear_4bit(x, packed, absmax, code, blocksize, [int(d) for d in shape], _stream(x))


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
    with torch.cuda.device(grad.device):
        return extension.linear_4bit_input_grad(
            grad, packed, absmax, code, blocksize, [int(d) for d in shape], _stream(grad)
        )


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
    with torch.cuda.device(x.device):
        extension.bgmv(*tensors, y, _stream(x))
    return y


#: The CUDA registration table; the blockwise 8-bit pair has no CUDA kernel and keeps the reference one.
CUDA_KERNELS = {
    "quantize_4bit": _quantize_4bit,
    "dequantize_4bit": _dequantize_4bit,
    "linear_4bit": _linear_4bit,
    "linear_4bit_input_grad": _linear_4bit_input_grad,
    "bgmv": _bgmv,
}
register_backend("cuda", cuda_extension, CUDA_KERNELS)
