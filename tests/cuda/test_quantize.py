"""CUDA quantize/dequantize are bit-exact with the CPU kernels (and so with bitsandbytes).

Cases: random shapes over every block size, NF4/FP4, fp32/fp16/bf16 inputs, nearest and
stochastic rounding, all-zero blocks, outliers and non-finite values. The shapes are drawn here
and not imported from ``tests/quantization/test_bnb_exactness.py`` because that module imports
bitsandbytes, which the GPU machine lacks; they also reach sizes the GPU kernels split
differently (several 256-thread strides per block, several thousand blocks, odd ``numel``).

Stochastic rounding: ``csrc/cuda/kernels.cu`` draws ``uniform_at(seed, i)`` from
``csrc/include/lightning_qlora/element.h`` for flat element ``i`` -- the counter-based stream
the CPU kernel and the reference (``reference.uniform_stream``) use -- so the same seed must give
the same codes on both devices, which is what we assert (no documented difference is needed).
"""

from __future__ import annotations

import random

import pytest
import torch

from lightning_qlora.ops import op
from lightning_qlora.quantization import quantize_4bit
from lightning_qlora.quantization.codebooks import get_codebook

from .marks import CUDA_ONLY

pytestmark = CUDA_ONLY

BLOCKS = (32, 64, 128, 256, 512, 1024, 2048, 4096)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _cases(count: int) -> list[tuple]:
    """``(shape, blocksize, dtype, quant_type, rounding_seed, seed)``; half the cases round stochastically."""
    rng = random.Random(1717)
    cases = []
    for i in range(count):
        dims = rng.choice([1, 2, 2, 3])
        limit = {1: 300_001, 2: 700, 3: 60}[dims]
        shape = tuple(rng.randint(1, limit) for _ in range(dims))
        rounding_seed = rng.randint(0, 2**40) if (i // 2) % 2 else None
        cases.append((shape, BLOCKS[i % len(BLOCKS)], DTYPES[i % 3], ("nf4", "fp4")[i % 2], rounding_seed, i))
    return cases


def _weight(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * torch.rand((), generator=g) * 4
    flat = w.view(-1)
    if seed % 5 == 0:
        flat[: min(flat.numel(), 5000)] = 0  # all-zero blocks: the absmax floor path
    if seed % 7 == 0:
        flat[::13] *= 50  # outliers
    return w.to(dtype)


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Bit pattern of a float tensor (so -0.0 != 0.0 and NaN == NaN compare exactly), on the CPU."""
    view = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}[t.dtype]
    return t.detach().cpu().contiguous().view(view)


@pytest.mark.parametrize(("shape", "blocksize", "dtype", "quant_type", "rounding_seed", "seed"), _cases(64))
def test_quantize_and_dequantize_equal_the_cpu_kernels(shape, blocksize, dtype, quant_type, rounding_seed, seed):
    w = _weight(shape, dtype, seed)
    code = get_codebook(quant_type)
    packed, absmax = op("quantize_4bit")(w.cuda(), code.cuda(), blocksize, rounding_seed)
    expected_packed, expected_absmax = op("quantize_4bit")(w, code, blocksize, rounding_seed)
    assert packed.is_cuda and absmax.is_cuda
    assert torch.equal(packed.cpu(), expected_packed)
    assert torch.equal(_bits(absmax), _bits(expected_absmax))
    for out_dtype in DTYPES:
        values = op("dequantize_4bit")(packed, absmax, code.cuda(), blocksize, list(shape), out_dtype)
        expected = op("dequantize_4bit")(expected_packed, expected_absmax, code, blocksize, list(shape), out_dtype)
        assert values.is_cuda and values.dtype == out_dtype
        assert torch.equal(_bits(values), _bits(expected))


def test_stochastic_rounding_is_seeded_on_cuda():
    w = torch.randn(4096, 64, device="cuda")
    code = get_codebook("nf4", "cuda")
    nearest, _ = op("quantize_4bit")(w, code, 64)
    first, _ = op("quantize_4bit")(w, code, 64, 7)
    assert torch.equal(first, op("quantize_4bit")(w, code, 64, 7)[0])
    assert not torch.equal(first, op("quantize_4bit")(w, code, 64, 8)[0])
    assert not torch.equal(first, nearest)


def test_stochastic_rounding_is_unbiased_on_cuda():
    # E[dequantize(stochastic(x))] = x between neighbouring codes: the mean error over 2^20
    # draws is within 6 standard errors of 0 (each error is at most one code gap, < 0.33).
    x = (torch.rand(1 << 20, device="cuda") * 2 - 1).mul_(0.999)
    x[0] = 1.0  # absmax 1 in the first block keeps scaled == x there
    code = get_codebook("nf4", "cuda")
    packed, absmax = op("quantize_4bit")(x, code, 4096, 123)
    error = op("dequantize_4bit")(packed, absmax, code, 4096, [x.numel()], torch.float32) - x
    assert abs(error.mean().item()) < 6 * 0.33 / (x.numel() ** 0.5)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_blocks_equal_the_cpu_kernels(value):
    x = torch.randn(5, 64)
    x[1, 7] = value
    x[3, 0] = -value
    code = get_codebook("nf4")
    packed, absmax = op("quantize_4bit")(x.cuda(), code.cuda(), 64)
    expected_packed, expected_absmax = op("quantize_4bit")(x, code, 64)
    assert torch.equal(packed.cpu(), expected_packed) and torch.equal(_bits(absmax), _bits(expected_absmax))
    values = op("dequantize_4bit")(packed, absmax, code.cuda(), 64, [5, 64], torch.float32)
    assert torch.isfinite(values[[0, 2, 4]]).all()


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_double_quantized_weight_decodes_the_same_on_both_devices(quant_type):
    w = torch.randn(1024, 777, dtype=torch.bfloat16)
    on_gpu = quantize_4bit(w.cuda(), quant_type, 64, double_quant=True)
    on_cpu = quantize_4bit(w, quant_type, 64, double_quant=True)
    assert torch.equal(on_gpu.packed.cpu(), on_cpu.packed)  # the 4-bit codes do not depend on the DQ
    # The DQ offset is mean(absmax): a reduction whose order differs by device (as in bitsandbytes,
    # which also takes it with torch on the weight's device), so it may differ in its last bits.
    torch.testing.assert_close(on_gpu.nested.offset.cpu(), on_cpu.nested.offset, rtol=1e-6, atol=0)
    moved = on_gpu.to("cpu")
    assert torch.equal(_bits(on_gpu.block_absmax()), _bits(moved.block_absmax()))
    assert torch.equal(_bits(on_gpu.dequantize()), _bits(moved.dequantize()))
