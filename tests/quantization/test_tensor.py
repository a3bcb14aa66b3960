"""Quantized4bitTensor: dequantize, moves, state dicts, bitsandbytes interop, memory."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from lightning_qlora.errors import CorruptStateError
from lightning_qlora.quantization import (
    Linear4bit,
    Quantized4bitTensor,
    UnsupportedOperationError,
    from_bnb_state_dict,
    from_quant_state,
    quantize_4bit,
    to_bnb_state_dict,
    to_quant_state,
    weight_memory,
)
from lightning_qlora.quantization.codebooks import nf4_codebook

from .bnb_oracle import bits, bnb_quantize_4bit


def test_bits_per_param_nf4_dq_4096_square_is_4_127():
    q = quantize_4bit(torch.randn(4096, 4096), "nf4", 64, double_quant=True)
    memory = weight_memory(q)
    # 4 bits + 8 bits / 64 for absmax codes + 32 bits / (64 * 256) nested absmax, plus the
    # offset and the two codebooks (16 + 256 float32) -- counted exactly:
    expected_bytes = 4096 * 4096 // 2 + 4096 * 4096 // 64 + 4 * (4096 * 4096 // 64 // 256) + 4 + 4 * (16 + 256)
    assert memory.quantized_bytes == q.storage_nbytes() == expected_bytes
    assert round(memory.bits_per_param, 3) == 4.127
    assert memory.saved_bytes == 4096 * 4096 * 4 - expected_bytes


def test_bits_per_param_without_double_quant():
    q = quantize_4bit(torch.randn(256, 256), "nf4", 64, double_quant=False)
    assert q.storage_nbytes() == 256 * 256 // 2 + 4 * (256 * 256 // 64) + 4 * 16


def test_exact_codes_round_trip_exactly():
    # Values that are codebook entries times a power-of-two absmax dequantize exactly.
    codes = torch.randint(0, 16, (64, 64))
    codes[:, 0] = 15  # +1.0 in every block so absmax is exactly the scale
    w = nf4_codebook()[codes] * 0.5
    q = quantize_4bit(w, "nf4", 64, double_quant=False)
    assert torch.equal(q.dequantize(), w)


def test_dtype_and_device_moves_keep_codes():
    w = torch.randn(32, 48, dtype=torch.bfloat16)
    q = quantize_4bit(w)
    assert q.dtype == torch.bfloat16 and q.dequantize().dtype == torch.bfloat16
    as_fp32 = q.to(torch.float32)
    assert isinstance(as_fp32, Quantized4bitTensor) and as_fp32.dtype == torch.float32
    assert torch.equal(as_fp32.packed, q.packed)
    assert torch.equal(as_fp32.dequantize(), q.dequantize(torch.float32))
    meta = q.to("meta")
    assert meta.device.type == "meta" and meta.packed.device.type == "meta"
    assert torch.equal(q.clone().packed, q.packed) and q.clone().packed.data_ptr() != q.packed.data_ptr()


def test_unsupported_op_names_it():
    q = quantize_4bit(torch.randn(8, 64))
    with pytest.raises(UnsupportedOperationError, match="aten.add"):
        q + 1


def test_functional_linear_uses_dequantized_weight():
    w, x, b = torch.randn(16, 64), torch.randn(3, 64), torch.randn(16)
    q = quantize_4bit(w)
    expected = x @ q.dequantize().T + b
    assert torch.allclose(torch.nn.functional.linear(x, q, b), expected, atol=1e-6)


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_state_dict_round_trip_through_safetensors(tmp_path, quant_type, double_quant):
    q = quantize_4bit(torch.randn(33, 70, dtype=torch.float16), quant_type, 128, double_quant=double_quant)
    save_file(to_bnb_state_dict(q, "layer.weight"), tmp_path / "w.safetensors")
    loaded = from_bnb_state_dict(load_file(tmp_path / "w.safetensors"), "layer.weight")
    assert loaded.shape == q.shape and loaded.dtype == q.dtype
    assert torch.equal(bits(loaded.dequantize()), bits(q.dequantize()))


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_state_dict_is_byte_identical_to_bitsandbytes(quant_type, double_quant):
    w = torch.randn(40, 96)
    ours = to_bnb_state_dict(quantize_4bit(w, quant_type, 64, double_quant=double_quant))
    packed, state = bnb_quantize_4bit(w, quant_type, 64, double_quant)
    theirs = {"weight": packed, **{f"weight.{k}": v for k, v in state.as_dict(packed=True).items()}}
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert ours[key].dtype == theirs[key].dtype, key
        assert torch.equal(ours[key], theirs[key]), key


def _bnb_linear(in_features: int, out_features: int, quant_type: str, double_quant: bool):
    import bitsandbytes as bnb

    return bnb.nn.Linear4bit(
        in_features,
        out_features,
        bias=True,
        compute_dtype=torch.float32,
        compress_statistics=double_quant,
        quant_type=quant_type,
    )


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_our_state_dict_loads_into_bitsandbytes_linear4bit(quant_type, double_quant):
    import bitsandbytes as bnb

    # in_features a multiple of the block size: bitsandbytes 0.50's CPU kernel restarts blocks
    # at every row and gets other layers wrong (see bnb_oracle.bnb_dequantize_4bit).
    dense = torch.nn.Linear(128, 40)
    ours = Linear4bit.from_linear(dense, quant_type, 64, double_quant)
    sd = ours.state_dict()
    theirs = _bnb_linear(128, 40, quant_type, double_quant)
    weight_stats = {k: v for k, v in sd.items() if k.startswith("weight.")}
    theirs.weight = bnb.nn.Params4bit.from_prequantized(sd["weight"], weight_stats, device="cpu")
    theirs.bias = torch.nn.Parameter(sd["bias"].clone())
    x = torch.randn(5, 128)
    with torch.no_grad():
        assert torch.allclose(theirs(x), ours(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("double_quant", [True, False])
def test_bitsandbytes_state_dict_loads_into_ours(double_quant):
    import bitsandbytes as bnb

    dense = torch.nn.Linear(64, 24)
    theirs = _bnb_linear(64, 24, "nf4", double_quant)
    theirs.weight = bnb.nn.Params4bit(
        dense.weight.data.clone(), requires_grad=False, quant_type="nf4", compress_statistics=double_quant
    )._quantize("cpu")
    theirs.bias = torch.nn.Parameter(dense.bias.data.clone())
    ours = Linear4bit.from_linear(torch.nn.Linear(64, 24), "nf4", 64, double_quant)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(7, 64)
    with torch.no_grad():
        assert torch.allclose(ours(x), theirs(x), atol=1e-5, rtol=1e-5)
    assert torch.equal(ours.weight.packed, theirs.weight.data.reshape(-1))


def test_quant_state_round_trip():
    w = torch.randn(50, 64)
    packed, state = bnb_quantize_4bit(w, "nf4", 64, True)
    ours = from_quant_state(packed, state)
    assert torch.equal(ours.dequantize(), quantize_4bit(w).dequantize())
    back = to_quant_state(ours)
    assert back == state


def test_corrupt_state_dict_raises_typed_errors():
    sd = to_bnb_state_dict(quantize_4bit(torch.randn(16, 64)))
    missing = {k: v for k, v in sd.items() if not k.endswith("nested_absmax")}
    with pytest.raises(CorruptStateError, match="nested_absmax"):
        from_bnb_state_dict(missing)
    truncated = dict(sd, weight=sd["weight"][:-3])
    with pytest.raises(CorruptStateError, match="bytes"):
        from_bnb_state_dict(truncated)
    garbage = dict(sd, **{"weight.quant_state.bitsandbytes__nf4": torch.tensor([123, 34, 255], dtype=torch.uint8)})
    with pytest.raises(CorruptStateError, match="cannot be read"):
        from_bnb_state_dict(garbage)


def test_linear4bit_gradients_match_dense_on_the_dequantized_weight():
    layer = Linear4bit.from_linear(torch.nn.Linear(64, 32))
    x = torch.randn(4, 64, requires_grad=True)
    layer(x).square().sum().backward()
    x_ref = x.detach().clone().requires_grad_()
    bias_ref = layer.bias.detach().clone().requires_grad_()
    torch.nn.functional.linear(x_ref, layer.weight.dequantize(), bias_ref).square().sum().backward()
    assert torch.allclose(x.grad, x_ref.grad, atol=1e-5)
    assert torch.allclose(layer.bias.grad, bias_ref.grad, atol=1e-5)
    assert not layer.weight.requires_grad
