"""Pure-PyTorch reference kernels for every op in :mod:`lightning_qlora.ops.schemas`.

They run on any device, define the exact semantics the compiled kernels must reproduce,
and are the oracle those kernels are tested against. Deterministic rounding is bit-exact
with bitsandbytes 0.50 on CPU, including its quirks, which we keep on purpose so packed
weights interoperate:

* 4-bit: full blocks scale by ``x * (1 / absmax)``, the last partial block by
  ``x / absmax``; an all-zero block stores absmax 0 (full) or 1e-38 (partial); the nearest
  code is chosen against float32 midpoints, a value exactly on a midpoint taking the
  lower code.
* 8-bit: ``x * (1 / absmax)``, then the code is read from a 65536-entry table over [-1, 1]
  (:func:`encode_lookup_table_8bit`), so a value within ~1.5e-5 of a midpoint between two
  codes may take the farther one, exactly as bitsandbytes' CPU kernel does; an all-zero
  block stores absmax 0 and code index 0.

Stochastic rounding (``seed`` given) rounds ``x`` between neighbouring codes ``lo <= x <= hi``
up with probability ``(x - lo) / (hi - lo)``, so ``E[dequantize(quantize(x))] = x``. Its
uniform draws come from a counter-based hash of ``(seed, flat index)`` (:func:`uniform_stream`),
which the C++ and CUDA kernels compute identically: the same seed gives the same codes on
every device and thread count.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lightning_qlora.errors import (
    BLOCK_SIZES_4BIT,
    ShapeMismatchError,
    BLOCK_SIZES_8BIT,
    check_block_size,
    check_float_dtype,
    check_output_dtype,
)
from lightning_qlora.ops.schemas import (
    check_bgmv_args,
    check_linear_compact_args,
    check_codebook,
    check_dequantize_4bit_args,
    check_dequantize_8bit_args,
    check_linear_4bit_args,
    qualified_name,
)

_MASK32 = 0xFFFFFFFF
# Multipliers below 2^31 so 32-bit x 31-bit products never overflow int64 arithmetic.
_MIX1 = 0x7FEB352D
_MIX2 = 0x5BD1E995
_GOLDEN = 0x61C88647
_TINY_ABSMAX = 1e-38  # bitsandbytes' floor for the reciprocal of an all-zero block's absmax


def _mix32(h: torch.Tensor) -> torch.Tensor:
    h = h ^ (h >> 16)
    h = (h * _MIX1) & _MASK32
    h = h ^ (h >> 15)
    h = (h * _MIX2) & _MASK32
    return h ^ (h >> 16)


def uniform_stream(seed: int, numel: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Uniform float32 draws in [0, 1) for flat indices ``0..numel-1``.

    ``u_i = (mix32(lo32(i) ^ mix32(hi32(i) + lo32(seed) * 0x61C88647)) >> 8) * 2^-24`` where
    ``mix32`` is a 32-bit xorshift-multiply finalizer. Pure integer arithmetic, so every
    backend reproduces it exactly.
    """
    index = torch.arange(numel, dtype=torch.int64, device=device)
    key = ((seed & _MASK32) * _GOLDEN) & _MASK32
    h = _mix32((index & _MASK32) ^ _mix32(((index >> 32) + key) & _MASK32))
    return (h >> 8).to(torch.float32) * (1.0 / (1 << 24))


def _scale_blocks_4bit(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split ``flat`` (float32) into blocks; return ``(x / absmax clamped to [-1, 1], absmax)``."""
    n = flat.numel()
    full = n - n % blocksize
    body = flat[:full].view(-1, blocksize)
    absmax = body.abs().amax(dim=1)
    scaled = (body * (1.0 / absmax.clamp(min=_TINY_ABSMAX)).unsqueeze(1)).clamp(-1, 1).reshape(-1)
    if full < n:
        tail_absmax = flat[full:].abs().amax().clamp(min=_TINY_ABSMAX)
        absmax = torch.cat([absmax, tail_absmax.unsqueeze(0)])
        scaled = torch.cat([scaled, (flat[full:] / tail_absmax).clamp(-1, 1)])
    return scaled, absmax


def _stochastic_round(scaled: torch.Tensor, sorted_code: torch.Tensor, seed: int) -> torch.Tensor:
    """Index into ``sorted_code`` rounding each value up with probability of its position."""
    last = sorted_code.numel() - 1
    lo = (torch.searchsorted(sorted_code, scaled, right=True) - 1).clamp(0, last - 1)
    lo_value, hi_value = sorted_code[lo], sorted_code[lo + 1]
    # Duplicate codes (FP4's +0/-0) make a zero-width interval only below the last copy,
    # and searchsorted(right=True) always lands on the last copy, so width > 0 here.
    p_up = ((scaled - lo_value) / (hi_value - lo_value)).clamp(0, 1)
    u = uniform_stream(seed, scaled.numel(), scaled.device)
    return lo + (u < p_up).to(lo.dtype)


def _encode_nearest_midpoint(scaled: torch.Tensor, sorted_code: torch.Tensor) -> torch.Tensor:
    midpoints = (sorted_code[:-1] + sorted_code[1:]) / 2
    return torch.bucketize(scaled, midpoints)


def quantize_4bit(
    A: torch.Tensor, code: torch.Tensor, blocksize: int, seed: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference for ``lightning_qlora::quantize_4bit`` (see the module docstring)."""
    check_float_dtype(A)
    check_block_size(blocksize, BLOCK_SIZES_4BIT)
    check_codebook(code, 16)
    flat = A.reshape(-1).float()
    scaled, absmax = _scale_blocks_4bit(flat, blocksize)
    if scaled.numel() % 2:
        scaled = torch.nn.functional.pad(scaled, (0, 1))  # a zero pads the last byte
    code = code.to(scaled.device)
    order = torch.argsort(code, stable=True)
    sorted_code = code[order]
    if seed is None:
        sorted_index = _encode_nearest_midpoint(scaled, sorted_code)
    else:
        sorted_index = _stochastic_round(scaled, sorted_code, seed)
    codes = order[sorted_index].to(torch.uint8)
    packed = (codes[0::2] << 4) | codes[1::2]
    return packed, absmax


def dequantize_4bit(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    blocksize: int,
    shape: Sequence[int],
    dtype: torch.dtype,
) -> torch.Tensor:
    """Reference for ``lightning_qlora::dequantize_4bit``: ``code[q] * absmax`` in float32, then cast."""
    check_output_dtype(dtype)
    check_dequantize_4bit_args(packed, absmax, code, blocksize, shape)
    numel = 1
    for dim in shape:
        numel *= dim
    bytes_ = packed.reshape(-1)
    codes = torch.stack([bytes_ >> 4, bytes_ & 0xF], dim=1).reshape(-1)[:numel]
    values = code.to(packed.device)[codes.long()]
    scale = absmax.repeat_interleave(blocksize)[:numel]
    return (values * scale).to(dtype).reshape(tuple(shape))


_LUT_STEPS = 65535  # the 8-bit encoder looks codes up on a grid of 65536 points over [-1, 1]


_LUT_CACHE: dict[tuple[str, bytes], torch.Tensor] = {}


def encode_lookup_table_8bit(code: torch.Tensor) -> torch.Tensor:
    """bitsandbytes' 8-bit encoding table: grid point ``c`` -> index of the nearest code.

    Grid point ``c`` (0..65535) stands for ``v_c = 2c / 65535 - 1`` (float32 arithmetic);
    its entry counts the float32 midpoints of neighbouring codes lying strictly below it.
    Tables are cached per codebook and device (building one took half of a double
    quantization of a 4096x4096 weight's absmax); the cache holds a handful of codebooks.
    """
    key = (str(code.device), code.detach().float().cpu().numpy().tobytes())
    table = _LUT_CACHE.get(key)
    if table is None:
        if len(_LUT_CACHE) >= 8:
            _LUT_CACHE.clear()
        table = _LUT_CACHE[key] = _build_lookup_table_8bit(code)
    return table


def _build_lookup_table_8bit(code: torch.Tensor) -> torch.Tensor:
    grid = torch.arange(_LUT_STEPS + 1, dtype=torch.float32, device=code.device)
    values = (grid + grid) / float(_LUT_STEPS) - 1.0
    midpoints = (code[:-1] + code[1:]) * 0.5
    return torch.searchsorted(midpoints, values, side="left")


def grid_index_8bit(normed: torch.Tensor) -> torch.Tensor:
    """Grid point of each normalized value: ``trunc(fma(65535, (x + 1) / 2, 0.5))``.

    The fused multiply-add rounds once; float64 holds the exact product and sum (24-bit
    by 16-bit mantissas), so one rounding to float32 reproduces the FMA exactly.
    """
    half = (normed + 1.0) * 0.5
    fused = (half.double() * _LUT_STEPS + 0.5).float()
    return fused.to(torch.int64) & 0xFFFF


def quantize_blockwise_8bit(
    A: torch.Tensor, code: torch.Tensor, blocksize: int, seed: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference for ``lightning_qlora::quantize_blockwise_8bit`` (see the module docstring)."""
    check_float_dtype(A)
    check_block_size(blocksize, BLOCK_SIZES_8BIT)
    check_codebook(code, 256)
    flat = A.reshape(-1).float()
    n = flat.numel()
    blocks = -(-n // blocksize)
    padded = torch.nn.functional.pad(flat, (0, blocks * blocksize - n)).view(blocks, blocksize)
    absmax = padded.abs().amax(dim=1)
    inverse = torch.where(absmax > 0, 1.0 / absmax, torch.zeros_like(absmax))
    normed = (padded * inverse.unsqueeze(1)).clamp(-1, 1).reshape(-1)[:n]
    code = code.to(flat.device)
    if seed is None:
        index = encode_lookup_table_8bit(code)[grid_index_8bit(normed)]
    else:
        index = _stochastic_round(normed, code, seed)
    zero_block = (absmax == 0).repeat_interleave(blocksize)[:n]
    index = torch.where(zero_block, 0, index)
    return index.to(torch.uint8).reshape(A.shape), absmax


def dequantize_blockwise_8bit(
    codes: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    blocksize: int,
    dtype: torch.dtype,
    offset: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference for ``lightning_qlora::dequantize_blockwise_8bit``: ``code[q] * absmax`` (``+ offset``), then cast."""
    check_output_dtype(dtype)
    check_dequantize_8bit_args(codes, absmax, code, blocksize, offset)
    n = codes.numel()
    values = code.to(codes.device)[codes.reshape(-1).long()]
    scale = absmax.repeat_interleave(blocksize)[:n]
    decoded = values * scale
    if offset is not None:  # added to the rounded product, as bitsandbytes' dequantize-then-add
        decoded = decoded + offset.to(decoded.device).reshape(())
    return decoded.to(dtype).reshape(codes.shape)


def linear_4bit(
    x: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    blocksize: int,
    shape: Sequence[int],
) -> torch.Tensor:
    """Reference for ``lightning_qlora::linear_4bit``: dequantize to float32, ``x @ W^T``, cast to x's dtype."""
    check_linear_4bit_args(x, packed, absmax, code, blocksize, shape, features_dim=1)
    weight = dequantize_4bit(packed, absmax, code, blocksize, shape, torch.float32)
    return torch.nn.functional.linear(x.float(), weight).to(x.dtype)


def linear_4bit_input_grad(
    grad: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    blocksize: int,
    shape: Sequence[int],
) -> torch.Tensor:
    """Reference for ``lightning_qlora::linear_4bit_input_grad``: ``grad @ W`` in float32, cast to grad's dtype."""
    check_linear_4bit_args(grad, packed, absmax, code, blocksize, shape, features_dim=0)
    weight = dequantize_4bit(packed, absmax, code, blocksize, shape, torch.float32)
    return (grad.float() @ weight).to(grad.dtype)


def _check_bgmv_tables(
    pool: torch.Tensor,
    a_rows: torch.Tensor,
    b_rows: torch.Tensor,
    ranks: torch.Tensor,
    indices: torch.Tensor,
    in_features: int,
    out_features: int,
) -> None:
    """Raise :class:`ShapeMismatchError` if a table names a slot, rank or pool row that does not exist."""
    slots, max_rank = a_rows.shape
    if indices.numel() and (indices.min() < -1 or indices.max() >= slots):
        raise ShapeMismatchError(
            f"bgmv indices must lie in [-1, {slots}) (one slot per row, -1 = none), "
            f"got values in [{int(indices.min())}, {int(indices.max())}]."
        )
    if ranks.numel() and (ranks.min() < 0 or ranks.max() > max_rank):
        raise ShapeMismatchError(f"bgmv ranks must lie in [0, {max_rank}], got {ranks.tolist()}.")
    used = torch.arange(max_rank, device=ranks.device) < ranks.unsqueeze(1)
    for offsets, length in ((a_rows, in_features), (b_rows, out_features)):
        bad = used & ((offsets < 0) | (offsets > pool.numel() - length))
        if bad.any():
            raise ShapeMismatchError(
                f"bgmv table names a pool row outside the pool ({pool.numel()} floats, rows of {length}); "
                "the adapter's pages were freed or the offsets are stale."
            )


def bgmv(
    x: torch.Tensor,
    pool: torch.Tensor,
    a_rows: torch.Tensor,
    b_rows: torch.Tensor,
    ranks: torch.Tensor,
    scales: torch.Tensor,
    indices: torch.Tensor,
    out_features: int,
) -> torch.Tensor:
    """Reference for ``lightning_qlora::bgmv``: gather each row's factors, ``scale * (x A^T) B^T`` in float32."""
    check_bgmv_args(x, pool, a_rows, b_rows, ranks, scales, indices, out_features)
    rows, in_features = x.shape
    _check_bgmv_tables(pool, a_rows, b_rows, ranks, indices, in_features, out_features)
    y = x.new_zeros((rows, out_features))
    active = (indices >= 0).nonzero().squeeze(1)
    max_rank = a_rows.shape[1]
    if active.numel() == 0 or max_rank == 0 or pool.numel() == 0:
        return y
    slot = indices[active]
    used = torch.arange(max_rank, device=x.device) < ranks[slot].unsqueeze(1)  # (n, R)
    last = pool.numel() - 1  # unused rank rows gather from a clamped, in-bounds place and are masked out

    def gather(offsets: torch.Tensor, length: int) -> torch.Tensor:  # (n, R) offsets -> (n, R, length)
        index = torch.where(used, offsets[slot], 0).unsqueeze(2) + torch.arange(length, device=x.device)
        return pool[index.clamp(max=last)]

    shrunk = (gather(a_rows, in_features) @ x[active].unsqueeze(2)).squeeze(2) * used  # (n, R)
    expanded = (shrunk.unsqueeze(1) @ gather(b_rows, out_features)).squeeze(1)  # (n, out)
    y[active] = scales[slot].unsqueeze(1) * expanded
    return y


REFERENCE_KERNELS = {
    "quantize_4bit": quantize_4bit,
    "dequantize_4bit": dequantize_4bit,
    "quantize_blockwise_8bit": quantize_blockwise_8bit,
    "dequantize_blockwise_8bit": dequantize_blockwise_8bit,
    "linear_4bit": linear_4bit,
    "linear_4bit_input_grad": linear_4bit_input_grad,
}


def linear_compact(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, blocksize: int) -> torch.Tensor:
    """Reference for ``lightning_qlora::linear_compact``: widen the weight to float32, ``x @ W^T``, cast to x's dtype."""
    check_linear_compact_args(x, weight, scales, blocksize)
    if weight.dtype == torch.int8:
        full = (weight.float().view(-1, blocksize) * scales.view(-1, 1)).view(weight.shape)
    else:
        full = weight.float()
    return torch.nn.functional.linear(x.float(), full).to(x.dtype)


#: Serving ops, kept out of REFERENCE_KERNELS (and so out of ops.OP_NAMES) until tests/ops/test_opcheck.py
#: has samples for them; tests/serving/test_bgmv.py opchecks them meanwhile.
SERVING_KERNELS = {"bgmv": bgmv, "linear_compact": linear_compact}

# CompositeExplicitAutograd: the kernel for every device that has no kernel of its own.
for _name, _kernel in {**REFERENCE_KERNELS, **SERVING_KERNELS}.items():
    torch.library.impl(qualified_name(_name), "CompositeExplicitAutograd", func=_kernel)
