"""CUDA fused 4-bit products, ``bgmv`` and ``torch.library.opcheck`` of every op on cuda.

Bounds are the CPU tests' own, imported from them: the fused GEMV / input gradient use exactly
the dequantized weight values, so they differ from dequantize-then-matmul only in the order of the
float32 additions (``2 n u sum|x_k w_k|`` per output, ``u = 2^-24``; plus one ulp of a 16-bit
output dtype) -- a GPU warp reduction is one more summation order. ``bgmv`` on cuda and on the
CPU are both within ``2 (in + r) u`` of the exact product, so within twice that of each other.
The CUDA kernels are compiled with ``-fmad=false``, so no fused multiply-add escapes the bound.
"""

from __future__ import annotations

import pytest
import torch

from lightning_qlora.ops import OP_NAMES, op, reference
from tests.ops.test_fused_linear import _assert_within_roundoff, _cases, _quantized
from tests.ops.test_opcheck import _samples
from tests.serving.test_bgmv import UNIT_ROUNDOFF, _dense, _problem

from .marks import CUDA_ONLY, to_device

pytestmark = CUDA_ONLY


@pytest.mark.parametrize(("shape", "batch", "blocksize", "dtype", "quant_type", "seed"), _cases(48))
def test_linear_4bit_and_input_grad_on_cuda_within_the_readme_bound(shape, batch, blocksize, dtype, quant_type, seed):
    weight = _quantized(shape, quant_type, blocksize, seed)
    x = torch.randn(*batch, shape[1], generator=torch.Generator().manual_seed(seed)).to(dtype)
    w = reference.dequantize_4bit(*weight, torch.float32)
    result = op("linear_4bit")(x.cuda(), *to_device(weight))
    assert result.is_cuda
    _assert_within_roundoff(result.cpu(), reference.linear_4bit(x, *weight), x.float().abs() @ w.abs().T, shape[1])
    g = torch.randn(*batch, shape[0], generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    grad = op("linear_4bit_input_grad")(g.cuda(), *to_device(weight))
    assert grad.is_cuda
    _assert_within_roundoff(
        grad.cpu(), reference.linear_4bit_input_grad(g, *weight), g.float().abs() @ w.abs(), shape[0]
    )


@pytest.mark.parametrize("rows", [1, 8, 9, 512])  # fused GEMV up to 8 rows, dequantize + cuBLAS beyond
def test_large_weight_linear_on_cuda_within_the_bound(rows):
    weight = _quantized((4096, 4096), "nf4", 64, 3)
    x = torch.randn(rows, 4096, generator=torch.Generator().manual_seed(rows))
    w = reference.dequantize_4bit(*weight, torch.float32)
    result = op("linear_4bit")(x.cuda(), *to_device(weight)).cpu()
    _assert_within_roundoff(result, reference.linear_4bit(x, *weight), x.abs() @ w.abs().T, 4096)


@pytest.mark.parametrize("seed", range(6))
def test_bgmv_on_cuda_equals_the_cpu_kernel_within_roundoff(seed):
    args = _problem(seed, rows=1 + 9 * seed, in_features=5 + 11 * seed, out_features=1 + 12 * seed)
    _, magnitude = _dense(args)
    n = args[0].shape[1] + args[2].shape[1]
    result = op("bgmv")(*to_device(args))
    assert result.is_cuda
    expected = op("bgmv")(*args)
    assert ((result.cpu() - expected).abs() <= 4 * n * UNIT_ROUNDOFF * magnitude + 1e-30).all()
    unadapted = args[6] < 0
    assert torch.equal(result.cpu()[unadapted], torch.zeros_like(expected[unadapted]))


def test_bgmv_large_ranks_on_cuda():
    # the problem's pool rows overlap (64 floats apart) and it has 500 spare floats: lengths up to 557
    args = _problem(11, rows=64, in_features=512, out_features=544, ranks=(64, 16, 1, 32, 0, 8))
    _, magnitude = _dense(args)
    n = args[0].shape[1] + args[2].shape[1]
    result = op("bgmv")(*to_device(args)).cpu()
    assert ((result - op("bgmv")(*args)).abs() <= 4 * n * UNIT_ROUNDOFF * magnitude + 1e-30).all()


@pytest.mark.parametrize("name", OP_NAMES)
def test_opcheck_on_cuda(name):
    for args in _samples(name):
        torch.library.opcheck(op(name), to_device(args))


def test_bgmv_opcheck_on_cuda():
    torch.library.opcheck(op("bgmv"), to_device(_problem(0)))
    torch.library.opcheck(op("bgmv"), to_device(_problem(1, rows=1, ranks=(2,))))
