"""Bit-exactness with bitsandbytes 0.50 (CPU) over many random shapes."""

from __future__ import annotations

import random

import pytest
import torch

from lightning_qlora.quantization import quantize_4bit, quantize_blockwise_8bit
from lightning_qlora.quantization.bnb_format import to_quant_state

from .bnb_oracle import bits, bnb_dequantize_4bit, bnb_functional, bnb_quantize_4bit

BLOCKS = (32, 64, 128, 256, 512, 1024, 2048, 4096)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _cases(count: int) -> list[tuple]:
    rng = random.Random(1234)
    cases = []
    for i in range(count):
        dims = rng.choice([1, 2, 2, 3])
        shape = tuple(rng.randint(1, 97 if dims > 1 else 9000) for _ in range(dims))
        cases.append((shape, BLOCKS[i % len(BLOCKS)], DTYPES[i % 3], ("nf4", "fp4")[i % 2], bool((i // 2) % 2), i))
    return cases


def _weight(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * torch.rand((), generator=g) * 4
    flat = w.view(-1)
    if seed % 5 == 0:
        flat[: min(flat.numel(), 300)] = 0  # all-zero blocks take bitsandbytes' zero-absmax path
    if seed % 7 == 0:
        flat[::13] *= 50  # outliers
    return w.to(dtype)


@pytest.mark.parametrize(("shape", "blocksize", "dtype", "quant_type", "double_quant", "seed"), _cases(64))
def test_quantize_and_dequantize_match_bitsandbytes(shape, blocksize, dtype, quant_type, double_quant, seed):
    w = _weight(shape, dtype, seed)
    ref_packed, ref_state = bnb_quantize_4bit(w, quant_type, blocksize, double_quant)
    ours = quantize_4bit(w, quant_type, blocksize, double_quant=double_quant)

    assert torch.equal(ours.packed, ref_packed.reshape(-1))
    state = to_quant_state(ours)
    assert torch.equal(state.absmax, ref_state.absmax)  # uint8 codes with DQ, float32 bits without
    assert torch.equal(state.code, ref_state.code)
    if double_quant:
        assert bits(ours.nested.offset.reshape(1)).item() == bits(ref_state.offset.reshape(1)).item()
        assert torch.equal(bits(state.state2.absmax), bits(ref_state.state2.absmax))
        assert torch.equal(state.state2.code, ref_state.state2.code)
        assert state.state2.blocksize == ref_state.state2.blocksize == 256

    ref_values = bnb_dequantize_4bit(ref_packed, ref_state).reshape(shape)
    ours_values = ours.dequantize()
    assert ours_values.dtype == dtype
    # Adding +0.0 maps -0.0 to +0.0 and leaves every other value's bits alone: bitsandbytes'
    # own CPU paths disagree on the sign of FP4's zero code 8 (its C kernel gives +0, its
    # PyTorch fallback the codebook's -0), so only the sign of zero is exempt.
    assert torch.equal(bits(ours_values + 0.0), bits(ref_values + 0.0))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("blocksize", (64, 256, 4096))
def test_blockwise_8bit_matches_bitsandbytes(dtype, blocksize):
    x = (torch.randn(9999) * 3).to(dtype)
    x[:blocksize] = 0
    codes, absmax = quantize_blockwise_8bit(x, blocksize)
    ref_codes, ref_state = bnb_functional.quantize_blockwise(x, blocksize=blocksize)
    assert torch.equal(codes, ref_codes)
    assert torch.equal(bits(absmax), bits(ref_state.absmax))


def test_8bit_encoder_matches_bitsandbytes_on_a_dense_grid():
    # Values near every midpoint of the dynamic map, where bitsandbytes' 65536-point lookup
    # table departs from true nearest rounding; a leading 1.0 makes absmax exactly 1.
    grid = torch.linspace(-1, 1, 400_003)
    x = torch.cat([torch.ones(1), grid])
    codes, _ = quantize_blockwise_8bit(x, blocksize=4096)
    ref_codes, _ = bnb_functional.quantize_blockwise(x, blocksize=4096)
    assert torch.equal(codes, ref_codes)
