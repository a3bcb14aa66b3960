"""Method name -> config class, and building a config from saved JSON with clear errors."""

from __future__ import annotations

import dataclasses
from typing import Any

from lightning_qlora.adapters.adalora import AdaLoRAConfig
from lightning_qlora.adapters.base import AdapterConfig, AdapterConfigError
from lightning_qlora.adapters.delta_lora import DeltaLoRAConfig
from lightning_qlora.adapters.dora import DoRAConfig
from lightning_qlora.adapters.lora import LoRAConfig
from lightning_qlora.adapters.lora_drop import LoRADropConfig
from lightning_qlora.adapters.lora_fa import LoRAFAConfig
from lightning_qlora.adapters.lora_plus import LoRAPlusConfig
from lightning_qlora.adapters.mixture import MixtureLoRAConfig
from lightning_qlora.adapters.vera import VeRAConfig

ADAPTER_CONFIGS: dict[str, type[AdapterConfig]] = {
    cls.method: cls
    for cls in (
        LoRAConfig,
        LoRAPlusConfig,
        LoRAFAConfig,
        DoRAConfig,
        VeRAConfig,
        AdaLoRAConfig,
        DeltaLoRAConfig,
        MixtureLoRAConfig,
        LoRADropConfig,
    )
}


def config_to_dict(config: AdapterConfig) -> dict[str, Any]:
    """``{"method": ..., <fields>}`` for JSON."""
    return {"method": config.method, **dataclasses.asdict(config)}


def config_differences(saved: AdapterConfig, current: AdapterConfig) -> list[str]:
    """``["alpha: 32.0 saved, 16.0 here", ...]`` for every setting that differs (the method first)."""
    if saved.method != current.method:
        return [f"method: {saved.method!r} saved, {current.method!r} here"]
    saved_fields, current_fields = config_to_dict(saved), config_to_dict(current)
    return [
        f"{key}: {saved_fields[key]!r} saved, {current_fields.get(key)!r} here"
        for key in saved_fields
        if saved_fields[key] != current_fields.get(key)
    ]


def config_from_dict(data: dict[str, Any], expected_method: str | None = None) -> AdapterConfig:
    """Rebuild a config; unknown methods, unknown fields and a method mismatch raise :class:`AdapterConfigError`."""
    data = dict(data)
    method = data.pop("method", None)
    if method not in ADAPTER_CONFIGS:
        raise AdapterConfigError(f"unknown adapter method {method!r}; known: {', '.join(ADAPTER_CONFIGS)}.")
    if expected_method is not None and method != expected_method:
        raise AdapterConfigError(f"this adapter was saved for method {method!r}, not {expected_method!r}.")
    cls = ADAPTER_CONFIGS[method]
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise AdapterConfigError(f"{method}: unknown config field(s) {unknown}; valid fields: {sorted(names)}.")
    try:
        return cls(**data)
    except TypeError as error:  # e.g. a saved field this version no longer takes
        raise AdapterConfigError(f"{method}: cannot build the config from {data!r} ({error}).") from None
