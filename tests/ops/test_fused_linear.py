"""The fused 4-bit products equal dequantize-then-matmul within float32 round-off.

Tolerance: every weight value the kernels use is ``code[q] * absmax`` exactly as
``dequantize_4bit`` computes it; only the order of the float32 additions differs (registers of
16 lanes + a tree reduction, or BLAS blocking, instead of torch's order). For any two
summation orders of ``n`` products the standard bound is ``|error| <= 2 * n * u * sum|x_k w_k|``
with ``u = 2^-24``, so we assert that bound per output element (it is rigorous, not tuned).
Outputs in fp16/bf16 are then rounded once more, so one ulp of that dtype is added.
"""

from __future__ import annotations

import random

import pytest
import torch

from lightning_qlora.ops import _extension, op, reference
from lightning_qlora.quantization.codebooks import get_codebook

UNIT_ROUNDOFF = 2.0**-24
BLOCKS = (32, 64, 128, 256, 4096)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _cases(count: int) -> list[tuple]:
    """Random (out, in, batch) incl. odd sizes, in % 32 == 0 (vectorized path), batch on both sides of 8."""
    rng = random.Random(4321)
    cases = []
    for i in range(count):
        in_features = rng.choice([rng.randint(1, 97), 32 * rng.randint(1, 6)])
        shape = (rng.randint(1, 97), in_features)
        batch = rng.choice([(1,), (2,), (8,), (9,), (3, 5), (40,)])
        cases.append((shape, batch, BLOCKS[i % len(BLOCKS)], DTYPES[i % 3], ("nf4", "fp4")[i % 2], i))
    return cases


def _quantized(shape: tuple[int, int], quant_type: str, blocksize: int, seed: int) -> tuple:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 3
    code = get_codebook(quant_type)
    packed, absmax = op("quantize_4bit")(w, code, blocksize, None)
    return packed, absmax, code, blocksize, list(shape)


def _assert_within_roundoff(result: torch.Tensor, expected: torch.Tensor, magnitude: torch.Tensor, n: int) -> None:
    bound = 2 * n * UNIT_ROUNDOFF * magnitude
    if result.dtype != torch.float32:
        bound = bound + torch.finfo(result.dtype).eps * expected.float().abs()
    assert result.dtype == expected.dtype and result.shape == expected.shape
    assert ((result.float() - expected.float()).abs() <= bound + 1e-30).all()


@pytest.mark.parametrize(("shape", "batch", "blocksize", "dtype", "quant_type", "seed"), _cases(48))
def test_linear_4bit_matches_dequantize_then_matmul(shape, batch, blocksize, dtype, quant_type, seed):
    weight = _quantized(shape, quant_type, blocksize, seed)
    x = torch.randn(*batch, shape[1], generator=torch.Generator().manual_seed(seed)).to(dtype)
    w = reference.dequantize_4bit(*weight, torch.float32)
    _assert_within_roundoff(
        op("linear_4bit")(x, *weight), reference.linear_4bit(x, *weight), x.float().abs() @ w.abs().T, shape[1]
    )
    g = torch.randn(*batch, shape[0], generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    _assert_within_roundoff(
        op("linear_4bit_input_grad")(g, *weight),
        reference.linear_4bit_input_grad(g, *weight),
        g.float().abs() @ w.abs(),
        shape[0],
    )


def test_compiled_kernels_are_in_use_when_built():
    if _extension.cpu_extension() is None:
        pytest.skip("C++ extension not built on this machine")
    weight = _quantized((64, 4096), "nf4", 64, 0)
    x = torch.randn(1, 4096)
    # Different summation order than the reference: equal only up to round-off, never bitwise.
    assert not torch.equal(op("linear_4bit")(x, *weight), reference.linear_4bit(x, *weight))


def test_forced_reference_path_is_the_reference(monkeypatch):
    monkeypatch.setenv(_extension.FORCE_REFERENCE_ENV, "1")
    weight = _quantized((33, 64), "fp4", 32, 3)
    x, g = torch.randn(2, 64), torch.randn(2, 33)
    assert torch.equal(op("linear_4bit")(x, *weight), reference.linear_4bit(x, *weight))
    assert torch.equal(op("linear_4bit_input_grad")(g, *weight), reference.linear_4bit_input_grad(g, *weight))


def test_wrong_input_width_names_the_expected_size():
    weight = _quantized((33, 64), "nf4", 64, 1)
    with pytest.raises(ValueError, match="in_features = 64"):
        op("linear_4bit")(torch.randn(2, 63), *weight)
    with pytest.raises(ValueError, match="out_features = 33"):
        op("linear_4bit_input_grad")(torch.randn(2, 64), *weight)


def test_compiled_model_with_fused_linear_matches_eager():
    from lightning_qlora.quantization import Linear4bit

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        Linear4bit.from_linear(torch.nn.Linear(256, 96)),
        torch.nn.ReLU(),  # inductor fuses GELU differently; ReLU keeps the check exact
        Linear4bit.from_linear(torch.nn.Linear(96, 40)),
    )
    compiled = torch.compile(model, fullgraph=True)
    for batch in (1, 16):  # fused GEMV and the GEMM path
        x = torch.randn(batch, 256)
        with torch.no_grad():
            assert torch.equal(compiled(x), model(x))
