"""The NaN/Inf check rides on the quantize kernel's pass (issue 18): no second scan, same typed error."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lightning_qlora.quantization.functional as functional
from lightning_qlora.errors import NonFiniteError, check_finite
from lightning_qlora.quantization import Linear4bit, quantize_4bit
from lightning_qlora.quantization.convert import quantize_linears


def _count_scans(monkeypatch) -> list[int]:
    calls = []

    def counting(tensor, name="input"):
        calls.append(tensor.numel())
        return check_finite(tensor, name)

    monkeypatch.setattr(functional, "check_finite", counting)
    return calls


def test_a_finite_weight_is_never_scanned_a_second_time(monkeypatch):
    scans = _count_scans(monkeypatch)
    quantize_4bit(torch.randn(256, 128), "nf4", 64)
    quantize_4bit(torch.randn(100, 7).half(), "fp4", 32, double_quant=False)
    assert scans == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("index", [0, 77, 64 * 20 + 3, 64 * 21 + 4])  # first, middle, last full and partial block
def test_each_non_finite_value_raises_the_same_error_as_the_scan(dtype, bad, index):
    weight = torch.randn(64 * 21 + 5).to(dtype)
    weight[index] = bad
    with pytest.raises(NonFiniteError) as expected:
        check_finite(weight)
    with pytest.raises(NonFiniteError) as caught:
        quantize_4bit(weight, "nf4", 64)
    assert str(caught.value) == str(expected.value)
    assert f"at flat index {index}" in str(caught.value)


def test_check_values_false_still_quantizes_to_a_visibly_broken_block():
    weight = torch.randn(128)
    weight[70] = float("nan")
    values = quantize_4bit(weight, "nf4", 64, double_quant=False, check_values=False).dequantize()
    assert values[64:].isnan().all() and values[:64].isfinite().all()


def test_converting_a_model_with_a_nan_layer_puts_every_converted_layer_back():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 16))
    with torch.no_grad():
        model[1].weight[2, 3] = float("nan")
    originals = list(model)
    with pytest.raises(NonFiniteError, match=r"^1\.weight holds 1 non-finite.*Nothing was converted"):
        quantize_linears(model, skip=())
    assert all(a is b for a, b in zip(model, originals))


def test_converting_a_finite_model_scans_no_weight_twice(monkeypatch):
    scans = _count_scans(monkeypatch)
    model = nn.Sequential(nn.Linear(16, 32), nn.Linear(32, 8))
    assert quantize_linears(model, skip=()) == ["0", "1"]
    assert scans == [] and all(isinstance(m, Linear4bit) for m in model)


def test_the_plugin_convert_path_does_not_scan_separately(monkeypatch):
    from lightning_qlora import qlora
    from lightning_qlora.plugins import NF4Precision

    scans = _count_scans(monkeypatch)
    if hasattr(qlora, "check_finite"):  # the old pre-scan lived in apply_qlora
        monkeypatch.setattr(qlora, "check_finite", lambda tensor, name="input": scans.append(tensor.numel()))
    model = nn.Sequential(nn.Linear(16, 32), nn.Linear(32, 8))
    NF4Precision(mode="nf4-dq", skip_modules=()).convert_module(model)
    assert scans == []
