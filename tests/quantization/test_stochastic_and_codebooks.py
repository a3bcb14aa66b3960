"""Stochastic rounding is unbiased; codebooks match their definitions."""

from __future__ import annotations

import pytest
import torch

from lightning_qlora.quantization import (
    dynamic_map_8bit,
    fp4_codebook,
    get_codebook,
    nf4_codebook,
    normal_float_codebook,
    quantize_4bit,
    quantize_blockwise_8bit,
    symmetric_int_codebook,
)
from lightning_qlora.quantization.functional import dequantize_blockwise_8bit

from .bnb_oracle import bnb_functional

NF4_FROM_DESIGN = [
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
]


def test_nf4_is_the_exact_published_table():
    assert nf4_codebook().tolist() == torch.tensor(NF4_FROM_DESIGN, dtype=torch.float32).tolist()


def test_fp4_and_dynamic_map_equal_bitsandbytes():
    assert torch.equal(fp4_codebook(), bnb_functional.get_4bit_type("fp4", device="cpu"))
    assert torch.equal(dynamic_map_8bit(), bnb_functional.create_dynamic_map())


def test_nfk_for_k4_reproduces_nf4_bit_for_bit():
    assert torch.equal(normal_float_codebook(4), nf4_codebook())


@pytest.mark.parametrize("bits", range(2, 9))
def test_nfk_shape_and_structure(bits):
    code = normal_float_codebook(bits)
    assert code.numel() == 2**bits
    assert code[0] == -1 and code[-1] == 1 and (code == 0).sum() == 1
    assert torch.all(code[1:] > code[:-1])
    assert (code > 0).sum() == 2 ** (bits - 1) and (code < 0).sum() == 2 ** (bits - 1) - 1


def test_nf2_hand_computed():
    # k=2, offset = 1 - (1/6 + 1/8)/2 = 0.8541666...: positives at quantiles (offset, mid),
    # one negative at -quantile(offset), normalized by the largest positive.
    offset = 1 - (1 / 6 + 1 / 8) / 2
    q_hi = torch.special.ndtri(torch.tensor(offset, dtype=torch.float64))
    q_mid = torch.special.ndtri(torch.tensor((offset + 0.5) / 2, dtype=torch.float32).double())
    expected = torch.tensor([-1.0, 0.0, (q_mid / q_hi).item(), 1.0])
    assert torch.allclose(normal_float_codebook(2), expected, atol=1e-6)


def test_symmetric_int_grids():
    assert torch.equal(symmetric_int_codebook(4)[1:], torch.tensor([i / 7 for i in range(-7, 8)], dtype=torch.float32))
    assert symmetric_int_codebook(8).numel() == 256
    assert get_codebook("nf3").numel() == 8


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_stochastic_rounding_is_unbiased_4bit(quant_type):
    # Mean over many independently seeded quantizations converges to the input: the
    # standard error of the mean shrinks as 1/sqrt(draws), nearest rounding does not.
    x = torch.randn(4, 256)
    x[:, 0] = 3.0  # fixed absmax per block so every draw scales identically
    draws = 400
    total = torch.zeros_like(x)
    for seed in range(draws):
        total += quantize_4bit(x, quant_type, 64, double_quant=False, seed=seed).dequantize()
    mean_error = (total / draws - x).abs()
    nearest_error = (quantize_4bit(x, quant_type, 64, double_quant=False).dequantize() - x).abs()
    # Each draw's error is at most one code gap (< 0.34 * absmax = 1.02 for FP4) ->
    # std of the mean <= 1.02 / 2 / sqrt(400) = 0.0255; allow 5 sigma for the worst element.
    assert mean_error.max() < 5 * 0.0255
    assert mean_error.mean() < 0.25 * nearest_error.mean()


def test_stochastic_rounding_is_unbiased_8bit():
    x = torch.rand(1024) * 2 - 1
    x[0] = 1.0
    mean = sum(dequantize_blockwise_8bit(*quantize_blockwise_8bit(x, 1024, seed=s), 1024) for s in range(200)) / 200
    assert (mean - x).abs().mean() < 0.25 * (
        dequantize_blockwise_8bit(*quantize_blockwise_8bit(x, 1024), 1024) - x
    ).abs().mean()


def test_stochastic_rounding_is_reproducible_and_exact_on_codes():
    x = torch.randn(3000)
    a = quantize_4bit(x, seed=11)
    assert torch.equal(a.packed, quantize_4bit(x, seed=11).packed)
    assert not torch.equal(a.packed, quantize_4bit(x, seed=12).packed)
    codes = torch.randint(0, 16, (64, 64))
    codes[:, 0] = 15
    exact = nf4_codebook()[codes]
    assert torch.equal(quantize_4bit(exact, double_quant=False, seed=5).dequantize(), exact)
