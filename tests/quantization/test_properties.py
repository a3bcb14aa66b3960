"""Property tests: the nearest-rounding error bound holds for any input."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_qlora.quantization import get_codebook, quantize_4bit


@settings(max_examples=60, deadline=None)
@given(
    numel=st.integers(1, 3000),
    blocksize=st.sampled_from([32, 64, 128, 256, 4096]),
    quant_type=st.sampled_from(["nf4", "fp4", "int4"]),
    scale=st.floats(1e-6, 1e4),
    seed=st.integers(0, 2**31 - 1),
)
def test_error_is_within_half_the_largest_code_gap(numel, blocksize, quant_type, scale, seed):
    x = torch.randn(numel, generator=torch.Generator().manual_seed(seed)) * scale
    q = quantize_4bit(x, quant_type, blocksize, double_quant=False)
    values = q.dequantize()
    code = get_codebook(quant_type).sort().values
    half_gap = ((code[1:] - code[:-1]).max() / 2).item()
    absmax = q.absmax.repeat_interleave(blocksize)[:numel]
    # float32 scaling adds a relative error of a few ulps on top of the rounding bound
    assert torch.all((values - x).abs() <= absmax * (half_gap + 1e-6))
    # every codebook holds +/-1, so each block's largest-magnitude element comes back exactly
    blocks = torch.nn.functional.pad(x, (0, -numel % blocksize)).view(-1, blocksize)
    where = blocks.abs().argmax(dim=1) + torch.arange(blocks.shape[0]) * blocksize
    assert torch.equal(values[where], x[where].sign() * q.absmax)
