"""Linear4bit's two forward paths (issue 18): the fused GEMV for decode-size batches, dequantize + F.linear above.

Pinned to closed-form references: each path equals the op it claims to run, bit for bit, and
both stay within fp32 round-off of the float64 product (Higham's gamma_n bound).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_qlora.ops import op
from lightning_qlora.quantization import Linear4bit
from lightning_qlora.quantization.linear import FUSED_MAX_ROWS
from lightning_qlora.quantization.tensor import Quantized4bitTensor


def _layer(out_features: int = 96, in_features: int = 128, bias: bool = True) -> Linear4bit:
    torch.manual_seed(0)
    return Linear4bit.from_linear(nn.Linear(in_features, out_features, bias=bias))


def _fused(layer: Linear4bit, x: torch.Tensor) -> torch.Tensor:
    w = layer.weight
    y = op("linear_4bit")(x, w.packed, w.block_absmax(), w.code, w.blocksize, list(w.shape))
    return y + layer.bias.to(y.dtype) if layer.bias is not None else y


def _roundoff_bound(layer: Linear4bit, x: torch.Tensor) -> float:
    magnitude = (x.double().abs().reshape(-1, x.shape[-1]) @ layer.weight.dequantize().double().abs().t()).max()
    return float(2 * x.shape[-1] * torch.finfo(torch.float32).eps * magnitude) + 1e-7


@pytest.mark.parametrize("shape", [(1, 128), (8, 128), (2, 3, 128), (FUSED_MAX_ROWS, 128)])
def test_decode_batches_take_the_fused_op_and_never_dequantize(shape, monkeypatch):
    layer = _layer()
    x = torch.randn(shape)
    expected = _fused(layer, x)

    def refuse(*args, **kwargs):
        raise AssertionError("a decode-size forward dequantized the whole weight")

    monkeypatch.setattr(Quantized4bitTensor, "dequantize", refuse)
    assert torch.equal(layer(x), expected)


def test_training_batches_dequantize_and_use_f_linear():
    layer = _layer()
    x = torch.randn(FUSED_MAX_ROWS + 1, 128)
    expected = torch.nn.functional.linear(x, layer.weight.dequantize(), layer.bias)
    assert torch.equal(layer(x), expected)


@pytest.mark.parametrize("rows", [1, 5, FUSED_MAX_ROWS, FUSED_MAX_ROWS + 1, 200])
@pytest.mark.parametrize("bias", [True, False])
def test_both_paths_are_within_roundoff_of_the_float64_product(rows, bias):
    layer = _layer(bias=bias)
    x = torch.randn(rows, 128)
    exact = x.double() @ layer.weight.dequantize().double().t()
    if bias:
        exact = exact + layer.bias.double()
    assert (layer(x).double() - exact).abs().max() <= _roundoff_bound(layer, x)


@pytest.mark.parametrize("rows", [1, FUSED_MAX_ROWS + 3])
def test_gradients_of_both_paths_match_the_float_reference(rows):
    layer = _layer()
    x = torch.randn(rows, 128, requires_grad=True)
    grad_out = torch.randn(rows, 96)
    layer(x).backward(grad_out)
    weight = layer.weight.dequantize().double()
    expected = grad_out.double() @ weight
    bound = float(2 * 96 * torch.finfo(torch.float32).eps * (grad_out.double().abs() @ weight.abs()).max()) + 1e-7
    assert (x.grad.double() - expected).abs().max() <= bound
    assert torch.allclose(layer.bias.grad, grad_out.sum(0), rtol=1e-5, atol=1e-5)


def test_bf16_decode_forward_returns_bf16_close_to_the_float_product():
    layer = _layer()
    x = torch.randn(2, 128).bfloat16()
    y = layer(x)
    assert y.dtype == torch.bfloat16
    exact = x.double() @ layer.weight.dequantize().double().t() + layer.bias.double()
    assert torch.allclose(y.double(), exact, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("fast_bf16", [True, False])
def test_bf16_products_leave_the_fused_gemv_above_8_rows_on_a_cpu_with_native_bf16(fast_bf16, monkeypatch):
    """Measured on an AVX512-BF16 CPU: bf16 BLAS beats the fp32-accumulating fused GEMV from ~8-16 rows
    (2-2.7x at 32-50, the main job's generation batch); without native bf16 the fp32 limit holds."""
    from lightning_qlora.quantization import linear
    from lightning_qlora.quantization.linear import FUSED_MAX_ROWS_BF16

    monkeypatch.setattr(linear, "_cpu_has_fast_bf16", lambda: fast_bf16)
    torch.manual_seed(0)
    layer = Linear4bit.from_linear(nn.Linear(128, 96), compute_dtype=torch.bfloat16)
    small, medium = torch.randn(FUSED_MAX_ROWS_BF16, 128), torch.randn(FUSED_MAX_ROWS_BF16 + 8, 128)
    with torch.no_grad():
        assert torch.equal(layer(small), _fused(layer, small))  # decode sizes: the fused op either way
        blas = torch.nn.functional.linear(
            medium.bfloat16(), layer.weight.dequantize(torch.bfloat16), layer.bias.bfloat16()
        )
        expected = blas.float() if fast_bf16 else _fused(layer, medium)
        assert torch.equal(layer(medium), expected)
        fp32_layer = Linear4bit(layer.weight, layer.bias.detach())  # fp32 products keep the fused limit
        assert torch.equal(fp32_layer(medium), _fused(fp32_layer, medium))
