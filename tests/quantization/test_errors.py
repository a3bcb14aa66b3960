"""Bad input raises a typed error that names the value and the accepted range."""

from __future__ import annotations

import pytest
import torch

from lightning_qlora.errors import (
    EmptyTensorError,
    InvalidBlockSizeError,
    NonFiniteError,
    QuantizationError,
    ShapeMismatchError,
    UnknownQuantTypeError,
    UnsupportedDTypeError,
)
from lightning_qlora.ops import op
from lightning_qlora.quantization import get_codebook, quantize_4bit, quantize_blockwise_8bit


@pytest.mark.parametrize(
    "dtype", [torch.int8, torch.int32, torch.int64, torch.uint8, torch.bool, torch.complex64, torch.float64]
)
def test_unsupported_dtypes(dtype):
    x = torch.zeros(64, 64).to(dtype)
    with pytest.raises(UnsupportedDTypeError, match=str(dtype)) as info:
        quantize_4bit(x)
    assert isinstance(info.value, TypeError) and "float32" in str(info.value)


def test_empty_tensor():
    with pytest.raises(EmptyTensorError, match=r"\(0, 64\)"):
        quantize_4bit(torch.empty(0, 64))


@pytest.mark.parametrize("blocksize", [0, 16, 48, 8192, -64, 64.0, True])
def test_unsupported_block_sizes(blocksize):
    with pytest.raises(InvalidBlockSizeError, match="32 to 4096") as info:
        quantize_4bit(torch.randn(64, 64), blocksize=blocksize)
    assert repr(blocksize) in str(info.value)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_values_are_refused_with_their_position(bad):
    x = torch.randn(10, 64)
    x[3, 5] = bad
    with pytest.raises(NonFiniteError, match="flat index 197"):
        quantize_4bit(x)
    with pytest.raises(NonFiniteError):
        quantize_blockwise_8bit(x)


def test_non_finite_with_checks_off_never_looks_plausible():
    x = torch.randn(2, 64)
    x[0, 3] = float("nan")
    values = quantize_4bit(x, double_quant=False, check_values=False).dequantize()
    assert torch.isnan(values[0]).all() or not torch.isfinite(values[0]).all()


def test_unknown_quant_type():
    with pytest.raises(UnknownQuantTypeError, match="'nf5'.*nf4, fp4, int4"):
        quantize_4bit(torch.randn(64), "nf5")


def test_shape_mismatch_on_dequantize():
    packed, absmax = op("quantize_4bit")(torch.randn(64, 64), get_codebook("nf4"), 64)
    with pytest.raises(ShapeMismatchError, match=r"shape \(64, 65\) needs 2080"):
        op("dequantize_4bit")(packed, absmax, get_codebook("nf4"), 64, [64, 65], torch.float32)
    with pytest.raises(ShapeMismatchError, match="another blocksize"):
        op("dequantize_4bit")(packed, absmax, get_codebook("nf4"), 128, [64, 64], torch.float32)
    with pytest.raises(UnsupportedDTypeError, match="int8"):
        op("dequantize_4bit")(packed, absmax, get_codebook("nf4"), 64, [64, 64], torch.int8)


def test_every_error_is_a_value_error():
    assert issubclass(UnsupportedDTypeError, QuantizationError) and issubclass(QuantizationError, ValueError)


@pytest.mark.parametrize("seed", [-1, 1.5, "1"])
def test_bad_seed(seed):
    with pytest.raises(UnknownQuantTypeError, match="seed"):
        quantize_4bit(torch.randn(64), seed=seed)
