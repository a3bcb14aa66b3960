"""The callbacks' error type and the check every adapter-driving callback makes at fit start."""

from __future__ import annotations

from typing import TypeVar

from torch import nn

from lightning_qlora.adapters import AdapterConfigError, adapter_layers

LayerT = TypeVar("LayerT")


class CallbackConfigError(AdapterConfigError):
    """A callback's settings do not fit the run (raised at construction or at fit start)."""


def required_layers(
    module: nn.Module, layer_type: type[LayerT], callback: str, kind: str, config: str
) -> dict[str, LayerT]:
    """``module``'s adapters of ``layer_type`` by name; :class:`CallbackConfigError` naming what it has instead if none."""
    layers = adapter_layers(module)
    found = {name: layer for name, layer in layers.items() if isinstance(layer, layer_type)}
    if not found:
        methods = sorted({layer.config.method for layer in layers.values()}) or ["no adapters"]
        raise CallbackConfigError(
            f"{callback} needs {kind} adapters, the model has {methods}; "
            f"use NF4Precision(adapter={config}(...)) or drop the callback."
        )
    return found
