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

from lightning_qlora.errors import NonFiniteError, check_finite

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

    ``check_values=True`` refuses a NaN/Inf weight (:class:`~lightning_qlora.errors.NonFiniteError`
    naming the layer) with no second pass over the weights: the quantize kernel's absmax reveals
    it, and the layers already converted are put back, so on that error the model is as it was.
    ``check_values=False`` skips the check.

    Returns:
        The qualified names of the layers that were quantized.
    """
    skip = tuple(skip)
    names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    done: list[str] = []
    replaced: list[tuple[nn.Module, str, nn.Linear]] = []
    mappings = file_backed_mappings()
    for name in names:
        if any(name == s or name.endswith("." + s) for s in skip):
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        linear = getattr(parent, child)
        try:
            quantized = Linear4bit.from_linear(linear, quant_type, blocksize, double_quant, check_values)
        except NonFiniteError:
            # The check rode on the quantize kernel's pass; undo the layers done so far, so the
            # model is as it was, then name this layer (the scan below runs only on failure).
            for owner, attribute, original in reversed(replaced):
                setattr(owner, attribute, original)
            try:
                check_finite(linear.weight, name=f"{name}.weight")
            except NonFiniteError as error:
                raise NonFiniteError(f"{error} Nothing was converted.") from None
            raise
        setattr(parent, child, quantized)
        replaced.append((parent, child, linear))
        weight = linear.weight
        # referrers: the old layer's parameter dict, `weight` and getrefcount's argument (`replaced`
        # holds the layer, not the tensor); a rollback reads released pages back from the file
        if mappings and sys.getrefcount(weight) <= 3:
            release_file_backed_pages(weight.detach(), itertools.chain(model.parameters(), model.buffers()), mappings)
        del weight
        done.append(name)
    return done
