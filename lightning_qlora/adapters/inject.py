"""Put adapters on the target Linear layers of any ``nn.Module`` and freeze everything else.

Targets are matched against qualified module names: ``"all-linear"``; a list of names,
each matching a module whose name is that name or ends in ``.<name>`` (``"q_proj"``); glob
patterns (``"model.layers.*.mlp.*"``); or regular expressions prefixed with ``re:``
(``"re:.*\\.(q|v)_proj"``).

Example:
    >>> wrapped = inject_adapters(model, LoRAConfig(r=8), target_modules=["q_proj", "v_proj"])
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Sequence
from typing import Any

from torch import nn

from lightning_qlora.adapters.base import AdapterConfigError, AdapterLayer
from lightning_qlora.quantization.linear import Linear4bit

_LINEAR_TYPES = (nn.Linear, Linear4bit)


def _matches(name: str, pattern: str) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    if any(ch in pattern for ch in "*?["):
        return fnmatch.fnmatchcase(name, pattern)
    return name == pattern or name.endswith("." + pattern)


def find_targets(model: nn.Module, target_modules: str | Sequence[str], exclude: Iterable[str] = ("lm_head",)) -> list[str]:
    """Qualified names of the Linear layers ``target_modules`` selects (minus ``exclude``)."""
    exclude = tuple(exclude)
    linears = [
        name for name, module in model.named_modules()
        if isinstance(module, _LINEAR_TYPES) and not isinstance(module, AdapterLayer)
        and ".base" not in f".{name}"  # layers already inside an adapter
    ]  # fmt: skip
    patterns = None if target_modules == "all-linear" else ([target_modules] if isinstance(target_modules, str) else list(target_modules))
    chosen = []
    for name in linears:
        if any(_matches(name, e) for e in exclude):
            continue
        if patterns is None or any(_matches(name, p) for p in patterns):
            chosen.append(name)
    if not chosen:
        sample = ", ".join(linears[:12]) + (", ..." if len(linears) > 12 else "")
        raise AdapterConfigError(
            f"target_modules={target_modules!r} matched no Linear layer (exclude={exclude}). "
            f"Linear layers in this model: {sample or 'none'}. Use names like 'q_proj', globs, 're:<regex>' or 'all-linear'."
        )
    return chosen


def inject_adapters(
    model: nn.Module,
    config: Any,
    target_modules: str | Sequence[str] = "all-linear",
    exclude: Iterable[str] = ("lm_head",),
) -> list[str]:
    """Wrap every targeted Linear of ``model`` with ``config.build(layer)``; freeze all else.

    Returns:
        The qualified names of the wrapped layers (their adapters live at ``<name>``).
    """
    names = find_targets(model, target_modules, exclude)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, config.build(getattr(parent, child)))
    if getattr(config, "method", None) == "lora_drop":  # late import: lora_drop imports this module
        from lightning_qlora.adapters.lora_drop import register_restore_hook

        register_restore_hook(model)
    return names


def adapter_layers(model: nn.Module) -> dict[str, AdapterLayer]:
    """Every adapter in ``model`` by qualified name."""
    return {name: module for name, module in model.named_modules() if isinstance(module, AdapterLayer)}


def adapter_param_groups(model: nn.Module, lr: float) -> list[dict[str, Any]]:
    """Optimizer groups of all adapters (e.g. LoRA+'s faster B), ready for any torch optimizer."""
    groups: list[dict[str, Any]] = []
    seen: set[int] = set()  # parameters shared by several layers (LoRA-drop) go in once
    for layer in adapter_layers(model).values():
        for group in layer.param_groups(lr):
            params = [p for p in group["params"] if id(p) not in seen]
            seen.update(id(p) for p in params)
            if params:
                groups.append({**group, "params": params})
    return groups
