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
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from lightning_qlora.adapters.base import AdapterConfig, AdapterConfigError, AdapterLayer
from lightning_qlora.quantization.linear import Linear4bit

_LINEAR_TYPES = (nn.Linear, Linear4bit)


def _matches(name: str, pattern: str) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    if any(ch in pattern for ch in "*?["):
        return fnmatch.fnmatchcase(name, pattern)
    return name == pattern or name.endswith("." + pattern)


def find_targets(
    model: nn.Module, target_modules: str | Sequence[str], exclude: Iterable[str] = ("lm_head",)
) -> list[str]:
    """Qualified names of the Linear layers ``target_modules`` selects (minus ``exclude``)."""
    exclude = tuple(exclude)
    linears = [
        name
        for name, module in model.named_modules()
        if isinstance(module, _LINEAR_TYPES)
        and not isinstance(module, AdapterLayer)
        and ".base" not in f".{name}"  # layers already inside an adapter
    ]
    patterns = (
        None
        if target_modules == "all-linear"
        else ([target_modules] if isinstance(target_modules, str) else list(target_modules))
    )
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
    config: AdapterConfig,
    target_modules: str | Sequence[str] = "all-linear",
    exclude: Iterable[str] = ("lm_head",),
) -> list[str]:
    """Wrap every targeted Linear of ``model`` with ``config.build(layer)``; freeze all else.

    Every adapter is built before the model is touched, so a bad config, target or layer
    raises and leaves ``model`` exactly as it was. A rank above a layer's ``min(in, out)`` is
    accepted, as PEFT does, with one warning naming those layers.

    Returns:
        The qualified names of the wrapped layers (their adapters live at ``<name>``).
    """
    if not isinstance(config, AdapterConfig):
        raise AdapterConfigError(
            f"config={config!r} is not an adapter config; use one from lightning_qlora.adapters, e.g. LoRAConfig(r=16)."
        )
    names = find_targets(model, target_modules, exclude)
    flags = [(parameter, parameter.requires_grad) for parameter in model.parameters()]
    try:
        built = {name: config.build(model.get_submodule(name)) for name in names}
    except BaseException:
        for parameter, flag in flags:  # building freezes each base: undo that too
            parameter.requires_grad_(flag)
        raise
    # building froze the wrapped bases; the model is only changed from here on, and nothing below can fail
    oversized = [name for name, layer in built.items() if config.r > min(layer.in_features, layer.out_features)]
    if oversized:
        warnings.warn(
            f"{config.method}: r={config.r} exceeds min(in, out) of {len(oversized)} layer(s) "
            f"({', '.join(oversized[:6])}{', ...' if len(oversized) > 6 else ''}); their adapters get more parameters "
            "than they can use (allowed, as in PEFT). Lower r or exclude those layers to save them.",
            stacklevel=2,
        )
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for name, layer in built.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer)
    for layer in built.values():
        layer.on_inject(model)
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


def adapter_extra_loss(model: nn.Module) -> torch.Tensor | None:
    """Sum of every adapter's ``extra_loss()`` (orthogonality, load balancing), or ``None`` if no method has one."""
    terms = [term for layer in adapter_layers(model).values() if (term := layer.extra_loss()) is not None]
    if not terms:
        return None
    return torch.stack([term.float() for term in terms]).sum()


def after_optimizer_step(model: nn.Module) -> int:
    """Run every adapter's per-step work (e.g. Delta-LoRA's base update); returns how many layers changed."""
    return sum(bool(layer.after_optimizer_step()) for layer in adapter_layers(model).values())
