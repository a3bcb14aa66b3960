"""Blockwise 8-bit quantization of optimizer state, with the encoding table built once.

Identical in results to ``torch.ops.lightning_qlora.quantize_blockwise_8bit`` (deterministic
rounding; the tests compare them bit for bit), but the reference kernel rebuilds its
65536-entry encoding table on every call (~60 ms), which would dominate a page-by-page update.
Here the table is cached per codebook and device, and the per-element steps are the reference
kernel's own helpers (:func:`~lightning_qlora.ops.reference.grid_index_8bit`).
"""

from __future__ import annotations

import torch

from lightning_qlora.ops.reference import encode_lookup_table_8bit, grid_index_8bit

_TABLES: dict[tuple[int, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}


def _encoding_table(code: torch.Tensor) -> torch.Tensor:
    key = (code.data_ptr(), code.device)
    cached = _TABLES.get(key)
    if cached is None or not torch.equal(cached[0], code):
        cached = (code.clone(), encode_lookup_table_8bit(code))
        _TABLES[key] = cached
    return cached[1]


def quantize_state_8bit(values: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes uint8, absmax float32)`` of a float32 1-D tensor, blockwise with ``code`` (256 sorted values)."""
    n = values.numel()
    blocks = -(-n // blocksize)
    padded = torch.nn.functional.pad(values, (0, blocks * blocksize - n)).view(blocks, blocksize)
    absmax = padded.abs().amax(dim=1)
    inverse = torch.where(absmax > 0, 1.0 / absmax, torch.zeros_like(absmax))
    normed = (padded * inverse.unsqueeze(1)).clamp(-1, 1).reshape(-1)[:n]
    index = _encoding_table(code)[grid_index_8bit(normed)]
    zero_block = (absmax == 0).repeat_interleave(blocksize)[:n]
    index = torch.where(zero_block, 0, index)
    return index.to(torch.uint8), absmax


def dequantize_state_8bit(
    codes: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int
) -> torch.Tensor:
    """float32 values of ``codes``: ``code[q] * absmax[block]``."""
    n = codes.numel()
    return code[codes.long()] * absmax.repeat_interleave(blocksize)[:n]
