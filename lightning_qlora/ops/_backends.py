"""One registration path for every device's compiled kernels: the table, the fallback, the validation order.

A device module (``ops/_extension.py`` for ``cpu``, ``ops/_cuda_extension.py`` for ``cuda``)
writes one table, op name -> compiled kernel, and hands it to :func:`register_backend` with
the function that returns its loaded extension. Each compiled kernel takes the extension
first, then the op's own arguments; it validates with our typed errors and calls the
extension. What is the same for every op and device lives here once:

* ``LIGHTNING_QLORA_FORCE_REFERENCE=1``, or an extension that could not be built (``None``,
  after the one warning of :mod:`lightning_qlora.ops._build`), runs the op's pure-PyTorch
  reference kernel from :mod:`lightning_qlora.ops.reference`, under the same name;
* an op a table leaves out keeps the reference kernel on that device (it is registered for
  every device as ``CompositeExplicitAutograd``); a name that is not one of our ops fails at import.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import torch

from lightning_qlora.ops import reference
from lightning_qlora.ops._build import force_reference
from lightning_qlora.ops.schemas import qualified_name

#: Every op's pure-PyTorch kernel, by name.
_REFERENCE = {**reference.REFERENCE_KERNELS, **reference.SERVING_KERNELS}


def _with_fallback(name: str, compiled: Callable[..., Any], extension: Callable[[], Any | None]) -> Callable[..., Any]:
    fallback = _REFERENCE[name]

    @functools.wraps(compiled)
    def kernel(*args: Any, **kwargs: Any) -> Any:
        loaded = None if force_reference() else extension()
        if loaded is None:
            return fallback(*args, **kwargs)
        return compiled(loaded, *args, **kwargs)

    return kernel


def register_backend(
    device: str, extension: Callable[[], Any | None], kernels: Mapping[str, Callable[..., Any]]
) -> None:
    """Register ``kernels`` (op name -> ``compiled(extension, *op_args)``) as ``device``'s kernels of our ops.

    Raises:
        RuntimeError: the table names an op we do not define (a programming error in the package, caught at import).
    """
    unknown = sorted(set(kernels) - set(_REFERENCE))
    if unknown:
        raise RuntimeError(
            f"the {device} kernel table names ops that do not exist: {unknown}; ours: {sorted(_REFERENCE)}"
        )
    for name, compiled in kernels.items():
        torch.library.register_kernel(qualified_name(name), device, _with_fallback(name, compiled, extension))
