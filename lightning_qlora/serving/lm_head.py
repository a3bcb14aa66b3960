"""Serving's ``lm_head`` in the smallest form that reproduces its weight exactly.

A decode step multiplies a few rows with the whole ``lm_head``: for SmolLM2 a 49152 x 576 fp32
matrix, 113 MB read per step, a third of a single-stream step (``benchmarks/decode_profile.py``).
Kept in float32 because it is tied to the embedding and must give the float model's logits, the
weight is often exactly representable in fewer bytes:

* ``"int8"``: every block of :data:`INT8_BLOCK` consecutive values is an int8 times one float32
  scale -- a GGUF ``Q8_0`` tensor as dequantized (our packaged SmolLM2's ``token_embd``), 4x fewer
  bytes;
* ``"bf16"``: every value is a bfloat16 -- a checkpoint stored in bf16 and loaded in fp32, 2x fewer.

:class:`CompactHead` detects the form by checking every value (no approximation: a weight that
is not exact in either form stays fp32) and multiplies with ``lightning_qlora::linear_compact``,
which widens the compact values to fp32 in registers; only the fp32 summation order differs from
``F.linear``. Batches over :data:`MAX_COMPACT_ROWS` rows go to the float module, where BLAS wins.

Example:
    >>> head = CompactHead(model.lm_head)  # doctest: +SKIP
    >>> head.form, head(hidden).shape  # doctest: +SKIP
    ('int8', torch.Size([4, 49152]))
"""

from __future__ import annotations

import torch
from torch import nn

from lightning_qlora.ops import op

__all__ = ["INT8_BLOCK", "MAX_COMPACT_ROWS", "CompactHead", "exact_bf16", "exact_int8_blocks"]

#: Values per int8 block (GGUF Q8_0's block).
INT8_BLOCK = 32
#: Rows up to which the compact GEMV is used; a bigger batch (a long prefill) uses the float module.
MAX_COMPACT_ROWS = 64
_ROWS_PER_CHECK = 4096  # output rows checked at a time: bounded temporaries for a big vocabulary


def exact_int8_blocks(weight: torch.Tensor, block: int = INT8_BLOCK) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(codes int8, scales float32)`` with ``codes * scale == weight`` for every value, or ``None``.

    The scale of a block is its largest magnitude over 127 (how Q8_0 stores it, so the largest code
    is +-127); the form is taken only if every value then equals its code times the scale in fp32.
    """
    if weight.dim() != 2 or weight.shape[1] % block != 0 or weight.numel() == 0:
        return None
    values = weight.detach().float()
    codes = torch.empty(values.shape, dtype=torch.int8)
    scales = torch.empty(values.numel() // block, dtype=torch.float32)
    blocks_per_row = values.shape[1] // block
    for start in range(0, values.shape[0], _ROWS_PER_CHECK):
        part = values[start : start + _ROWS_PER_CHECK].reshape(-1, block)
        scale = part.abs().amax(dim=1) / 127.0
        quotient = torch.round(part / torch.where(scale > 0, scale, 1.0).unsqueeze(1))
        if not torch.isfinite(scale).all() or quotient.abs().max() > 127:
            return None
        if not torch.equal(quotient * scale.unsqueeze(1), part):
            return None
        codes[start : start + _ROWS_PER_CHECK] = quotient.view(-1, values.shape[1]).to(torch.int8)
        scales[start * blocks_per_row : start * blocks_per_row + scale.numel()] = scale
    return codes, scales


def exact_bf16(weight: torch.Tensor) -> torch.Tensor | None:
    """The weight as bfloat16 if that loses nothing (every value is a bf16), else ``None``."""
    if weight.dim() != 2 or weight.numel() == 0:
        return None
    narrow = weight.detach().to(torch.bfloat16)
    return narrow if torch.equal(narrow.float(), weight.detach().float()) else None


class CompactHead:
    """``linear(hidden)`` through an exact compact copy of ``linear.weight`` when there is one.

    Args:
        linear: the model's output projection; anything but a plain CPU ``nn.Linear`` (a 4-bit
            layer, a CUDA module) is called as it is.

    Attributes:
        form: ``"int8"``, ``"bf16"`` or ``"float"`` (no exact compact form; the module is called).
    """

    def __init__(self, linear: nn.Module) -> None:
        self.linear = linear
        self.form = "float"
        self._weight = self._scales = None
        weight = getattr(linear, "weight", None)
        if type(linear) is not nn.Linear or weight is None or weight.device.type != "cpu":
            return
        if weight.dtype == torch.float32:
            found = exact_int8_blocks(weight)
            if found is not None:
                self.form, (self._weight, self._scales) = "int8", found
                return
        if weight.dtype in (torch.float32, torch.float16, torch.bfloat16):
            narrow = exact_bf16(weight)
            if narrow is not None:
                self.form, self._weight, self._scales = "bf16", narrow, torch.empty(0)

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits of ``hidden (rows, in)``."""
        if self._weight is None or hidden.shape[0] > MAX_COMPACT_ROWS:
            return self.linear(hidden).float()
        logits = op("linear_compact")(hidden.float(), self._weight, self._scales, INT8_BLOCK)
        if self.linear.bias is not None:
            logits = logits + self.linear.bias.float()
        return logits
