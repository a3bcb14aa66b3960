"""Replace a model's ``nn.Linear`` layers by 4-bit :class:`Linear4bit` layers, one at a time.

Layer by layer, so peak memory stays near the final size plus one float layer -- never a
second full float copy of the model. Float weights read from a memory-mapped checkpoint give
their pages back as soon as they are quantized (:mod:`lightning_qlora.quantization.release`).
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Iterable

from torch import nn

from lightning_qlora.quantization.linear import Linear4bit
from lightning_qlora.quantization.release import file_backed_mappings, release_file_backed_pages


def quantize_linears(
    model: nn.Module,
    quant_type: str = "nf4",
    blocksize: int = 64,
    double_quant: bool = True,
    skip: Iterable[str] = ("lm_head",),
    check_values: bool = True,
) -> list[str]:
    """Quantize every ``nn.Linear`` of ``model`` in place, except names ending in ``skip``.

    ``check_values=False`` skips the NaN/Inf scan (for callers that checked every weight first).

    Returns:
        The qualified names of the layers that were quantized.
    """
    skip = tuple(skip)
    names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    done = []
    mappings = file_backed_mappings()
    for name in names:
        if any(name == s or name.endswith("." + s) for s in skip):
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        linear = getattr(parent, child)
        setattr(parent, child, Linear4bit.from_linear(linear, quant_type, blocksize, double_quant, check_values))
        weight = linear.weight
        # referrers: the old layer's parameter dict, `weight` and getrefcount's argument
        if mappings and sys.getrefcount(weight) <= 3:
            release_file_backed_pages(weight.detach(), itertools.chain(model.parameters(), model.buffers()), mappings)
        del weight
        done.append(name)
    return done
