"""Method name -> config class, and building a config from saved JSON with clear errors."""

from __future__ import annotations

import dataclasses
from typing import Any

from lightning_qlora.adapters.adalora import AdaLoRAConfig
from lightning_qlora.adapters.base import AdapterConfigError
from lightning_qlora.adapters.delta_lora import DeltaLoRAConfig
from lightning_qlora.adapters.dora import DoRAConfig
from lightning_qlora.adapters.lora import LoRAConfig
from lightning_qlora.adapters.lora_drop import LoRADropConfig
from lightning_qlora.adapters.lora_fa import LoRAFAConfig
from lightning_qlora.adapters.lora_plus import LoRAPlusConfig
from lightning_qlora.adapters.mixture import MixtureLoRAConfig
from lightning_qlora.adapters.vera import VeRAConfig

ADAPTER_CONFIGS: dict[str, type] = {
    cls.method: cls for cls in (LoRAConfig, LoRAPlusConfig, LoRAFAConfig, DoRAConfig, VeRAConfig, AdaLoRAConfig, DeltaLoRAConfig, MixtureLoRAConfig, LoRADropConfig)
}


def config_to_dict(config: Any) -> dict[str, Any]:
    """``{"method": ..., <fields>}`` for JSON."""
    return {"method": config.method, **dataclasses.asdict(config)}


def config_from_dict(data: dict[str, Any], expected_method: str | None = None) -> Any:
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
    return cls(**data)
