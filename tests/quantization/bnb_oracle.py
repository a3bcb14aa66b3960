"""bitsandbytes as the test oracle, called on its CPU path without torch.compile.

bitsandbytes wraps some pure-PyTorch fallbacks in ``torch.compile``; compiling for every
test shape would cost minutes, and the eager function is the same computation.
"""

from __future__ import annotations

import logging

import torch

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # its optional 'kernels' package is absent here

import bitsandbytes.functional as bnb_functional  # noqa: E402


def bnb_quantize_4bit(x: torch.Tensor, quant_type: str, blocksize: int, double_quant: bool):
    with torch._dynamo.config.patch(disable=True):
        return bnb_functional.quantize_4bit(
            x, blocksize=blocksize, quant_type=quant_type, compress_statistics=double_quant
        )


def bnb_dequantize_4bit(packed: torch.Tensor, state) -> torch.Tensor:
    """bitsandbytes' dequantization, on the path that honours its own block layout.

    bitsandbytes 0.50's CPU C kernel restarts blocks at every row, so it dequantizes wrongly
    whenever ``shape[-1]`` is not a multiple of the block size (its quantizer, and its CUDA
    kernels, use blocks over the flat weight). There we use its PyTorch kernel instead.
    """
    with torch._dynamo.config.patch(disable=True):
        if state.shape[-1] % state.blocksize == 0:
            return bnb_functional.dequantize_4bit(packed, state)
        absmax = state.absmax
        if state.nested:
            absmax = bnb_functional.dequantize_blockwise(state.absmax, state.state2) + state.offset
        return _bnb_default_dequantize(packed, absmax, state)


def _bnb_default_dequantize(packed: torch.Tensor, absmax: torch.Tensor, state) -> torch.Tensor:
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    from bitsandbytes.backends.utils import _get_4bit_code

    code = _get_4bit_code(state.quant_type, packed.device)
    return _dequantize_4bit_compute(packed.reshape(-1), absmax, code, state.blocksize, state.shape, state.dtype)


def bits(t: torch.Tensor) -> torch.Tensor:
    """Bit pattern of a float tensor, so -0.0 != 0.0 and NaN == NaN compare exactly."""
    view = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}[t.dtype]
    return t.contiguous().view(view)
