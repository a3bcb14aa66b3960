"""The compiled CPU kernels are bit-exact with the reference kernels (and so with bitsandbytes)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from lightning_qlora.ops import _build, _extension, backend, op, reference
from lightning_qlora.quantization.codebooks import get_codebook

from ..quantization.bnb_oracle import bits
from ..quantization.test_bnb_exactness import _cases, _weight

# Locally a machine without a compiler skips these with the reason; in CI (LIGHTNING_QLORA_REQUIRE_COMPILED=1,
# set by .ci/run) a failed build fails them instead, so a broken build can never turn CI green.
_BUILT = _extension.cpu_extension() is not None
pytestmark = pytest.mark.skipif(
    not _BUILT and not _build.compiled_required(),
    reason=f"C++ extension not built on this machine: {_build.build_error('lightning_qlora_cpu')}",
)


def test_compiled_backend_is_active():
    assert _BUILT, f"the C++ extension did not build: {_build.build_error('lightning_qlora_cpu')}"
    assert backend() == "cpp"


@pytest.mark.parametrize(("shape", "blocksize", "dtype", "quant_type", "double_quant", "seed"), _cases(64))
def test_quantize_and_dequantize_equal_the_reference(shape, blocksize, dtype, quant_type, double_quant, seed):
    w = _weight(shape, dtype, seed)
    code = get_codebook(quant_type)
    rounding_seed = seed if double_quant else None  # half the cases use stochastic rounding
    packed, absmax = op("quantize_4bit")(w, code, blocksize, rounding_seed)
    ref_packed, ref_absmax = reference.quantize_4bit(w, code, blocksize, rounding_seed)
    assert torch.equal(packed, ref_packed)
    assert torch.equal(bits(absmax), bits(ref_absmax))
    for out_dtype in (torch.float32, torch.float16, torch.bfloat16):
        values = op("dequantize_4bit")(packed, absmax, code, blocksize, list(shape), out_dtype)
        expected = reference.dequantize_4bit(packed, absmax, code, blocksize, list(shape), out_dtype)
        assert torch.equal(bits(values), bits(expected))


def test_non_finite_blocks_dequantize_to_nan():
    x = torch.randn(3, 64)
    x[1, 7] = float("nan")
    packed, absmax = op("quantize_4bit")(x, get_codebook("nf4"), 64)
    values = op("dequantize_4bit")(packed, absmax, get_codebook("nf4"), 64, [3, 64], torch.float32)
    assert torch.isnan(values[1]).all() and torch.isfinite(values[[0, 2]]).all()


def test_environment_variable_forces_the_reference_path():
    code = "from lightning_qlora.ops import backend; print(backend())"
    env = dict(os.environ, **{_extension.FORCE_REFERENCE_ENV: "1"})
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "reference"
