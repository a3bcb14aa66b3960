"""Each custom op's schema and fake (meta) implementation, declared once.

Device kernels register against these names: the pure-PyTorch reference kernels in
:mod:`lightning_qlora.ops.reference` for every device, and the compiled C++/CUDA kernels
(when built) for their own dispatch keys. Fake implementations give shapes and dtypes
only, so ``torch.compile`` and meta-device tracing work without running a kernel.

Ops (all functional, no mutation):

* ``quantize_4bit(A, code, blocksize, seed=None) -> (packed, absmax)``
    ``A`` any shape, fp32/fp16/bf16; ``code`` the 16-entry float32 codebook (index = code);
    ``packed`` uint8 of shape ``(ceil(numel/2),)``, two codes per byte, first element in the
    high nibble; ``absmax`` float32 of shape ``(ceil(numel/blocksize),)``. ``seed`` switches
    on stochastic rounding (counter-based random stream, reproducible on every device).
* ``dequantize_4bit(packed, absmax, code, blocksize, shape, dtype) -> Tensor[shape]``
* ``quantize_blockwise_8bit(A, code, blocksize, seed=None) -> (codes, absmax)``
    ``code`` the 256-entry sorted codebook; ``codes`` uint8 with ``A``'s shape.
* ``dequantize_blockwise_8bit(codes, absmax, code, blocksize, dtype, offset=None) -> Tensor``
    ``code[codes] * absmax[block]`` (rounded to float32), ``+ offset`` (a float32 scalar tensor) when
    given, then cast to ``dtype``: with ``offset`` it decodes a double-quantized absmax in one pass.
* ``linear_4bit(x, packed, absmax, code, blocksize, shape) -> Tensor``
    ``x (..., in) @ W^T -> (..., out)`` for the 4-bit weight ``W`` of ``shape = (out, in)``
    (``absmax`` already float32, i.e. after undoing double quantization); accumulated in
    float32, returned in ``x``'s dtype. Compiled kernels never materialize ``W`` in full.
* ``linear_4bit_input_grad(grad, packed, absmax, code, blocksize, shape) -> Tensor``
    ``grad (..., out) @ W -> (..., in)``: the input gradient of ``linear_4bit``.
* ``bgmv(x, pool, a_rows, b_rows, ranks, scales, indices, out_features) -> Tensor``
    Batched heterogeneous LoRA (S-LoRA/punica BGMV): ``x (B, in)`` float32, ``pool`` the flat
    float32 page pool, ``a_rows``/``b_rows`` int64 ``(S, R)`` pool offsets of each adapter
    slot's ``lora_A`` rows (length ``in``) and ``lora_B`` columns (length ``out``), ``ranks``
    int64 ``(S,)`` (<= R), ``scales`` float32 ``(S,)``, ``indices`` int64 ``(B,)`` (slot per
    row, -1 = none). ``y[b] = scales[s] * sum_{j<ranks[s]} (x[b] . A_s[j]) B_s^T[j]``, ``(B, out)`` float32.
* ``linear_compact(x, weight, scales, blocksize) -> Tensor``
    ``x (..., in) @ W^T -> (..., out)`` for a weight kept in a compact form that is exact for it
    (serving's ``lm_head``): ``weight`` int8 ``(out, in)`` with ``scales`` float32, one per
    ``blocksize`` consecutive elements of the flat weight (``W = weight * scale``, how GGUF's Q8_0
    stores a tensor), or ``weight`` bfloat16 (``scales`` empty, ``blocksize`` ignored). Accumulated
    in float32, returned in ``x``'s dtype.
"""

from __future__ import annotations

from typing import Any

from collections.abc import Sequence

import torch

from lightning_qlora.errors import (
    BLOCK_SIZES_4BIT,
    BLOCK_SIZES_8BIT,
    ShapeMismatchError,
    check_block_size,
    check_float_dtype,
    check_output_dtype,
)

NAMESPACE = "lightning_qlora"

_SCHEMAS = {
    "quantize_4bit": "(Tensor A, Tensor code, int blocksize, int? seed=None) -> (Tensor, Tensor)",
    "dequantize_4bit": (
        "(Tensor packed, Tensor absmax, Tensor code, int blocksize, SymInt[] shape, ScalarType dtype) -> Tensor"
    ),
    "quantize_blockwise_8bit": "(Tensor A, Tensor code, int blocksize, int? seed=None) -> (Tensor, Tensor)",
    "dequantize_blockwise_8bit": (
        "(Tensor codes, Tensor absmax, Tensor code, int blocksize, ScalarType dtype, Tensor? offset=None) -> Tensor"
    ),
    "linear_4bit": "(Tensor x, Tensor packed, Tensor absmax, Tensor code, int blocksize, SymInt[] shape) -> Tensor",
    "linear_4bit_input_grad": (
        "(Tensor grad, Tensor packed, Tensor absmax, Tensor code, int blocksize, SymInt[] shape) -> Tensor"
    ),
    "linear_compact": "(Tensor x, Tensor weight, Tensor scales, int blocksize) -> Tensor",
    "bgmv": (
        "(Tensor x, Tensor pool, Tensor a_rows, Tensor b_rows, Tensor ranks, Tensor scales, Tensor indices, "
        "int out_features) -> Tensor"
    ),
}

_library = torch.library.Library(NAMESPACE, "DEF")
for _name, _schema in _SCHEMAS.items():
    _library.define(_name + _schema)


def qualified_name(op: str) -> str:
    """``"quantize_4bit"`` -> ``"lightning_qlora::quantize_4bit"``."""
    return f"{NAMESPACE}::{op}"


def num_blocks(numel: int, blocksize: int) -> int:
    """Number of blocks covering ``numel`` elements (the last one may be partial)."""
    return -(-numel // blocksize)


def check_codebook(code: torch.Tensor, entries: int) -> None:
    """Raise :class:`ShapeMismatchError` unless ``code`` is a float32 table of ``entries`` values."""
    if code.dtype != torch.float32 or code.dim() != 1 or code.numel() != entries:
        raise ShapeMismatchError(
            f"codebook must be a 1-D float32 tensor of {entries} values, got {code.dtype} of shape "
            f"{tuple(code.shape)}; use lightning_qlora.quantization.get_codebook(...)."
        )


def check_dequantize_4bit_args(
    packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int, shape: Sequence[int]
) -> None:
    """Validate the metadata of a 4-bit dequantization against the data it describes."""
    check_block_size(blocksize, BLOCK_SIZES_4BIT)
    check_codebook(code, 16)
    numel = 1
    for dim in shape:
        numel *= dim
    if packed.dtype != torch.uint8:
        raise ShapeMismatchError(f"packed 4-bit data must be uint8, got {packed.dtype}.")
    if packed.numel() != (numel + 1) // 2:
        raise ShapeMismatchError(
            f"packed data holds {packed.numel()} bytes but shape {tuple(shape)} needs {(numel + 1) // 2} "
            "(two 4-bit codes per byte); the shape does not belong to this weight."
        )
    if absmax.dtype != torch.float32 or absmax.numel() != num_blocks(numel, blocksize):
        raise ShapeMismatchError(
            f"absmax must be float32 with {num_blocks(numel, blocksize)} entries for shape {tuple(shape)} "
            f"and blocksize {blocksize}, got {absmax.dtype} with {absmax.numel()}; was it quantized with "
            "another blocksize?"
        )


def check_dequantize_8bit_args(
    codes: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int, offset: torch.Tensor | None = None
) -> None:
    """Validate an 8-bit blockwise dequantization."""
    check_block_size(blocksize, BLOCK_SIZES_8BIT)
    check_codebook(code, 256)
    if offset is not None and (offset.dtype != torch.float32 or offset.numel() != 1):
        raise ShapeMismatchError(
            f"offset must be one float32 value (the mean a double-quantized absmax was stored around), got "
            f"{offset.dtype} of shape {tuple(offset.shape)}."
        )
    if codes.dtype != torch.uint8:
        raise ShapeMismatchError(f"8-bit codes must be uint8, got {codes.dtype}.")
    if absmax.dtype != torch.float32 or absmax.numel() != num_blocks(codes.numel(), blocksize):
        raise ShapeMismatchError(
            f"absmax must be float32 with {num_blocks(codes.numel(), blocksize)} entries for "
            f"{codes.numel()} codes at blocksize {blocksize}, got {absmax.dtype} with {absmax.numel()}."
        )


def check_linear_4bit_args(
    x: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    blocksize: int,
    shape: Sequence[int],
    features_dim: int,
) -> None:
    """Validate a product with a 4-bit weight; ``x.shape[-1]`` must equal ``shape[features_dim]``."""
    check_float_dtype(x)
    if len(shape) != 2:
        raise ShapeMismatchError(f"a 4-bit linear weight must be 2-D (out, in), got shape {tuple(shape)}.")
    check_dequantize_4bit_args(packed, absmax, code, blocksize, shape)
    if x.dim() == 0 or x.shape[-1] != shape[features_dim]:
        side = "in_features" if features_dim == 1 else "out_features"
        raise ShapeMismatchError(
            f"input of shape {tuple(x.shape)} does not fit the 4-bit weight of shape {tuple(shape)}: its last "
            f"dimension must be {side} = {shape[features_dim]}."
        )


def check_linear_compact_args(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, blocksize: int) -> None:
    """Validate a product with a compact (int8-blockwise or bf16) weight."""
    check_float_dtype(x)
    if weight.dim() != 2 or weight.dtype not in (torch.int8, torch.bfloat16):
        raise ShapeMismatchError(
            f"a compact linear weight must be a 2-D int8 or bfloat16 tensor, got {weight.dtype} of shape "
            f"{tuple(weight.shape)}."
        )
    if x.dim() == 0 or x.shape[-1] != weight.shape[1]:
        raise ShapeMismatchError(
            f"input of shape {tuple(x.shape)} does not fit the weight of shape {tuple(weight.shape)}: its last "
            f"dimension must be in_features = {weight.shape[1]}."
        )
    if weight.dtype == torch.int8 and (
        blocksize <= 0 or scales.dtype != torch.float32 or scales.numel() * blocksize != weight.numel()
    ):
        raise ShapeMismatchError(
            f"an int8 weight of {weight.numel()} elements needs one float32 scale per block of {blocksize}: got "
            f"{scales.numel()} {scales.dtype} scales (blocksize must divide the element count)."
        )


def check_bgmv_args(
    x: torch.Tensor,
    pool: torch.Tensor,
    a_rows: torch.Tensor,
    b_rows: torch.Tensor,
    ranks: torch.Tensor,
    scales: torch.Tensor,
    indices: torch.Tensor,
    out_features: int,
) -> None:
    """Validate the dtypes and shapes of a ``bgmv`` call (pool offsets are checked by the kernels)."""
    if x.dtype != torch.float32 or pool.dtype != torch.float32 or scales.dtype != torch.float32:
        raise ShapeMismatchError(
            f"bgmv computes in float32: x, pool and scales must be float32, got {x.dtype}, {pool.dtype}, {scales.dtype}."
        )
    if any(t.dtype != torch.int64 for t in (a_rows, b_rows, ranks, indices)):
        raise ShapeMismatchError("bgmv tables a_rows, b_rows, ranks and indices must be int64.")
    if x.dim() != 2 or pool.dim() != 1 or indices.shape != (x.shape[0],):
        raise ShapeMismatchError(
            f"bgmv needs x (B, in), a flat pool and indices (B,), got x {tuple(x.shape)}, pool "
            f"{tuple(pool.shape)}, indices {tuple(indices.shape)}."
        )
    slots = a_rows.shape[0] if a_rows.dim() == 2 else -1
    if a_rows.dim() != 2 or b_rows.shape != a_rows.shape or ranks.shape != (slots,) or scales.shape != (slots,):
        raise ShapeMismatchError(
            f"bgmv tables must be a_rows/b_rows (S, R), ranks (S,), scales (S,); got {tuple(a_rows.shape)}, "
            f"{tuple(b_rows.shape)}, {tuple(ranks.shape)}, {tuple(scales.shape)}."
        )
    if isinstance(out_features, bool) or not isinstance(out_features, int) or out_features < 0:
        raise ShapeMismatchError(f"bgmv out_features={out_features!r} must be a non-negative int.")


def bgmv_operands(*args: Any) -> tuple[list[torch.Tensor], torch.Tensor]:
    """``bgmv``'s arguments validated (:func:`check_bgmv_args`) and made contiguous, and the output ``y``.

    Every device's compiled kernel writes into a ``y (rows, out_features)`` its caller allocates.
    """
    check_bgmv_args(*args)
    *tensors, out_features = args
    tensors = [t.contiguous() for t in tensors]
    return tensors, tensors[0].new_empty((tensors[0].shape[0], out_features))


@torch.library.register_fake(qualified_name("quantize_4bit"))
def _quantize_4bit_fake(
    A: torch.Tensor, code: torch.Tensor, blocksize: int, seed: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    check_float_dtype(A)
    check_block_size(blocksize, BLOCK_SIZES_4BIT)
    check_codebook(code, 16)
    n = A.numel()
    packed = A.new_empty(((n + 1) // 2,), dtype=torch.uint8)
    absmax = A.new_empty((num_blocks(n, blocksize),), dtype=torch.float32)
    return packed, absmax


@torch.library.register_fake(qualified_name("dequantize_4bit"))
def _dequantize_4bit_fake(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    blocksize: int,
    shape: Sequence[int],
    dtype: torch.dtype,
) -> torch.Tensor:
    check_output_dtype(dtype)
    check_dequantize_4bit_args(packed, absmax, code, blocksize, shape)
    return packed.new_empty(tuple(shape), dtype=dtype)


@torch.library.register_fake(qualified_name("quantize_blockwise_8bit"))
def _quantize_8bit_fake(
    A: torch.Tensor, code: torch.Tensor, blocksize: int, seed: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    check_float_dtype(A)
    check_block_size(blocksize, BLOCK_SIZES_8BIT)
    check_codebook(code, 256)
    codes = A.new_empty(A.shape, dtype=torch.uint8)
    absmax = A.new_empty((num_blocks(A.numel(), blocksize),), dtype=torch.float32)
    return codes, absmax


@torch.library.register_fake(qualified_name("dequantize_blockwise_8bit"))
def _dequantize_8bit_fake(
    codes: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    blocksize: int,
    dtype: torch.dtype,
    offset: torch.Tensor | None = None,
) -> torch.Tensor:
    check_output_dtype(dtype)
    check_dequantize_8bit_args(codes, absmax, code, blocksize, offset)
    return codes.new_empty(codes.shape, dtype=dtype)


@torch.library.register_fake(qualified_name("linear_4bit"))
def _linear_4bit_fake(
    x: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    blocksize: int,
    shape: Sequence[int],
) -> torch.Tensor:
    check_linear_4bit_args(x, packed, absmax, code, blocksize, shape, features_dim=1)
    return x.new_empty((*x.shape[:-1], shape[0]))


@torch.library.register_fake(qualified_name("linear_4bit_input_grad"))
def _linear_4bit_input_grad_fake(
    grad: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    blocksize: int,
    shape: Sequence[int],
) -> torch.Tensor:
    check_linear_4bit_args(grad, packed, absmax, code, blocksize, shape, features_dim=0)
    return grad.new_empty((*grad.shape[:-1], shape[1]))


@torch.library.register_fake(qualified_name("bgmv"))
def _bgmv_fake(
    x: torch.Tensor,
    pool: torch.Tensor,
    a_rows: torch.Tensor,
    b_rows: torch.Tensor,
    ranks: torch.Tensor,
    scales: torch.Tensor,
    indices: torch.Tensor,
    out_features: int,
) -> torch.Tensor:
    check_bgmv_args(x, pool, a_rows, b_rows, ranks, scales, indices, out_features)
    return x.new_empty((x.shape[0], out_features))


@torch.library.register_fake(qualified_name("linear_compact"))
def _linear_compact_fake(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, blocksize: int) -> torch.Tensor:
    check_linear_compact_args(x, weight, scales, blocksize)
    return x.new_empty((*x.shape[:-1], weight.shape[0]))
