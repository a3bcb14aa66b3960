"""Register our strategy names with Lightning the moment Lightning's strategy registry exists.

``import lightning_qlora`` must make ``Trainer(strategy="paged")`` work whichever is imported
first, without importing Lightning itself (3 s here; the server and the report never need it).
If ``lightning.pytorch.strategies`` is already imported we register at once; otherwise a
meta-path finder waits for that module to finish loading, registers, and removes itself. The
registry entries are factories that import our strategy classes only when a Trainer asks.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
from types import ModuleType
from typing import Any

_TARGET = "lightning.pytorch.strategies"
#: name -> (class name in lightning_qlora.strategies, description)
_STRATEGIES = {
    "paged": ("PagedStrategy", "one device, paged optimizer state"),
    "paged_ddp": ("PagedDDPStrategy", "DDP, paged optimizer state on every rank"),
    "qlora_fsdp": ("QLoRAFSDPStrategy", "FSDP for QLoRA (4-bit weights not sharded)"),
}


def _factory(class_name: str) -> Any:
    def build(**kwargs: Any) -> Any:
        from lightning_qlora import strategies

        return getattr(strategies, class_name)(**kwargs)

    build.__name__ = class_name
    return build


def register_strategies(module: ModuleType) -> None:
    """Add our names to ``module.StrategyRegistry`` (idempotent; names registered elsewhere are kept)."""
    registry = module.StrategyRegistry
    for name, (class_name, description) in _STRATEGIES.items():
        if name not in registry:
            registry.register(name, _factory(class_name), description=description)


class _Loader(importlib.abc.Loader):
    def __init__(self, wrapped: importlib.abc.Loader) -> None:
        self._wrapped = wrapped

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._wrapped.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._wrapped.exec_module(module)
        register_strategies(module)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname != _TARGET:
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader)
        return spec


def install() -> None:
    """Register now if Lightning's registry is loaded, else as soon as it is."""
    module = sys.modules.get(_TARGET)
    if module is not None and hasattr(module, "StrategyRegistry"):
        register_strategies(module)
    elif not any(isinstance(finder, _Finder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
