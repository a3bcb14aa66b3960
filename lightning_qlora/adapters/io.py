"""Save and load adapters on their own, and exchange them with PEFT.

Our format (a directory): ``adapter.safetensors`` (the adapters' own tensors, keyed
``<layer>.<param>``; for Delta-LoRA also the base layers it moved) and ``adapter.json`` (``{"format": "lightning_qlora", "config": {...},
"targets": [...]}``). Frozen random tensors that are regenerated from a seed (VeRA's
projections) are not saved. Loading checks the method, the targets and every shape, and
raises :class:`~lightning_qlora.adapters.AdapterConfigError` naming what does not fit.

PEFT's layout (``adapter_config.json`` + ``adapter_model.safetensors`` with keys
``base_model.model.<layer>.lora_A.weight``...) is written for LoRA, LoRA+, LoRA-FA and DoRA,
which PEFT represents as LoRA (``use_dora`` for DoRA), for AdaLoRA (pruned ranks are
exported as zero singular values, which gives the same outputs) and for VeRA (with the
projections saved; our per-layer ``1/sqrt(in)`` scale is folded into ``lambda_d``).
Import covers PEFT's LoRA/DoRA, AdaLoRA and VeRA (saved with its projections, which we then keep).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from lightning_qlora.adapters.adalora import AdaLoRAConfig, AdaLoRALayer
from lightning_qlora.adapters.base import AdapterConfigError
from lightning_qlora.adapters.delta_lora import DeltaLoRALayer
from lightning_qlora.adapters.dora import DoRALayer
from lightning_qlora.adapters.inject import adapter_layers, inject_adapters
from lightning_qlora.adapters.lora import LoRAConfig, LoRALayer
from lightning_qlora.adapters.lora_drop import SHARED_ATTRIBUTE, restore_lora_drop_structure
from lightning_qlora.adapters.registry import config_from_dict, config_to_dict
from lightning_qlora.adapters.vera import VeRAConfig, VeRALayer, global_projections

CONFIG_FILE, WEIGHTS_FILE = "adapter.json", "adapter.safetensors"
PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' own tensors, keyed ``<layer>.<param>``.

    Base layers are left out -- except under Delta-LoRA, which moves its base weights: there
    the adapted base layers (4-bit ones in bitsandbytes' keys) belong to the adapter.
    """
    out = {}
    for name, layer in adapter_layers(model).items():
        keep_base = isinstance(layer, DeltaLoRALayer)
        for key, value in layer.state_dict().items():
            if keep_base or not key.startswith("base."):
                out[f"{name}.{key}"] = value.detach().contiguous()
    shared = getattr(model, SHARED_ATTRIBUTE, None)  # LoRA-drop: the adapters dropped layers share
    if shared is not None:
        out.update({f"{SHARED_ATTRIBUTE}.{k}": v.detach().contiguous() for k, v in shared.state_dict().items()})
    return out


def save_adapters(model: nn.Module, directory: str | Path) -> Path:
    """Write the model's adapters (one method) to ``directory``; returns it."""
    layers = adapter_layers(model)
    if not layers:
        raise AdapterConfigError("the model has no adapters to save; call inject_adapters first.")
    configs = {config_to_dict(layer.config)["method"]: layer.config for layer in layers.values()}
    if len(configs) != 1:
        raise AdapterConfigError(f"save_adapters stores one method per directory, found {sorted(configs)}.")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(adapter_state_dict(model), directory / WEIGHTS_FILE)
    meta = {"format": "lightning_qlora", "config": config_to_dict(next(iter(configs.values()))), "targets": list(layers)}
    (directory / CONFIG_FILE).write_text(json.dumps(meta, indent=2))
    return directory


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as error:
        raise AdapterConfigError(f"{path} does not exist; is this an adapter directory?") from error
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise AdapterConfigError(f"{path} is not valid JSON ({error}); the adapter file is damaged.") from error


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except (FileNotFoundError, SafetensorError, OSError) as error:
        raise AdapterConfigError(f"cannot read adapter weights {path}: {error}") from error


def _load_into(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    restore_lora_drop_structure(model, tensors)
    layers = adapter_layers(model)
    for name, layer in layers.items():  # VeRA adapters saved with explicit (e.g. PEFT's) projections
        if isinstance(layer, VeRALayer) and f"{name}.vera_A" in tensors and f"{name}.vera_B" in tensors:
            layer.use_projections(tensors[f"{name}.vera_A"], tensors[f"{name}.vera_B"])
    own = adapter_state_dict(model)
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    if missing or unexpected:
        raise AdapterConfigError(f"adapter weights do not fit this model: missing {missing[:5]}, unexpected {unexpected[:5]}.")
    for key, value in tensors.items():
        if value.shape != own[key].shape and ".quant_state." not in key:  # that one is a JSON byte string
            raise AdapterConfigError(
                f"adapter tensor {key!r} has shape {tuple(value.shape)} but this model needs {tuple(own[key].shape)}; "
                "was it trained on another model or rank?"
            )
    with torch.no_grad():
        for name, layer in layers.items():
            prefix = name + "."
            layer.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}, strict=False)
        shared = getattr(model, SHARED_ATTRIBUTE, None)
        if shared is not None:
            prefix = SHARED_ATTRIBUTE + "."
            shared.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})


def load_adapters(model: nn.Module, directory: str | Path, expected_method: str | None = None) -> list[str]:
    """Inject the saved adapters into ``model`` (if not already there) and load their weights."""
    directory = Path(directory)
    meta = _read_json(directory / CONFIG_FILE)
    if meta.get("format") != "lightning_qlora" or "config" not in meta or "targets" not in meta:
        raise AdapterConfigError(f"{directory / CONFIG_FILE} is not a lightning_qlora adapter config.")
    config = config_from_dict(meta["config"], expected_method)
    targets = list(meta["targets"])
    if not adapter_layers(model):
        inject_adapters(model, config, targets, exclude=())
    present = adapter_layers(model)
    if sorted(present) != sorted(targets) or any(type(l.config) is not type(config) for l in present.values()):
        raise AdapterConfigError(f"the model's adapters {sorted(present)[:5]} are not the saved ones {targets[:5]}.")
    _load_into(model, _read_weights(directory / WEIGHTS_FILE))
    return targets


def _export_adalora(layers: dict[str, AdaLoRALayer], directory: Path) -> None:
    config = next(iter(layers.values())).config
    tensors = {}
    for name, layer in layers.items():
        prefix = f"base_model.model.{name}"
        tensors[f"{prefix}.lora_A"] = layer.lora_A.detach().contiguous()
        tensors[f"{prefix}.lora_B"] = layer.lora_B.detach().contiguous()
        tensors[f"{prefix}.lora_E"] = (layer.lora_E * layer.rank_mask).detach().unsqueeze(1).contiguous()
    save_file(tensors, directory / PEFT_WEIGHTS_FILE)
    peft_config = {
        "peft_type": "ADALORA", "task_type": None, "init_r": config.r,
        "target_r": max(layer.rank for layer in layers.values()), "lora_alpha": config.alpha,
        "lora_dropout": config.dropout, "orth_reg_weight": config.orth_reg_weight, "total_step": 1,
        "target_modules": sorted(layers), "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True,
        "modules_to_save": None, "base_model_name_or_path": None, "rank_pattern": None,
    }  # fmt: skip
    (directory / PEFT_CONFIG_FILE).write_text(json.dumps(peft_config, indent=2))


def _export_vera(layers: dict[str, VeRALayer], directory: Path) -> None:
    config = next(iter(layers.values())).config
    max_in = max(layer.in_features for layer in layers.values())
    max_out = max(layer.out_features for layer in layers.values())
    vera_a, vera_b = global_projections(config.seed, config.r, max_in, max_out)
    tensors = {"base_model.vera_A": vera_a, "base_model.vera_B": vera_b}
    for name, layer in layers.items():
        prefix = f"base_model.model.{name}"
        tensors[f"{prefix}.vera_lambda_b"] = layer.lambda_b.detach().contiguous()
        # our A is the global slice scaled by 1/sqrt(in); PEFT's is the bare slice
        tensors[f"{prefix}.vera_lambda_d"] = (layer.lambda_d.detach() / math.sqrt(layer.in_features)).contiguous()
    save_file(tensors, directory / PEFT_WEIGHTS_FILE)
    peft_config = {
        "peft_type": "VERA", "task_type": None, "r": config.r, "projection_prng_key": config.seed,
        "save_projection": True, "vera_dropout": config.dropout, "d_initial": config.d_initial,
        "target_modules": sorted(layers), "bias": "none", "fan_in_fan_out": False, "init_weights": True,
        "modules_to_save": None, "base_model_name_or_path": None,
    }  # fmt: skip
    (directory / PEFT_CONFIG_FILE).write_text(json.dumps(peft_config, indent=2))


def export_peft(model: nn.Module, directory: str | Path) -> Path:
    """Write the model's adapters in PEFT's layout (``PeftModel.from_pretrained`` loads it)."""
    layers = adapter_layers(model)
    directory = Path(directory)
    for layer_type, exporter in ((AdaLoRALayer, _export_adalora), (VeRALayer, _export_vera)):
        if layers and all(isinstance(layer, layer_type) for layer in layers.values()):
            directory.mkdir(parents=True, exist_ok=True)
            exporter(layers, directory)
            return directory
    if not layers or not all(isinstance(layer, LoRALayer) for layer in layers.values()):
        raise AdapterConfigError("PEFT export covers LoRA, LoRA+, LoRA-FA, DoRA, AdaLoRA and VeRA adapters.")
    config = next(iter(layers.values())).config
    tensors = {}
    for name, layer in layers.items():
        prefix = f"base_model.model.{name}"
        tensors[f"{prefix}.lora_A.weight"] = layer.lora_A.detach().contiguous()
        tensors[f"{prefix}.lora_B.weight"] = layer.lora_B.detach().contiguous()
        if isinstance(layer, DoRALayer):
            tensors[f"{prefix}.lora_magnitude_vector"] = layer.lora_magnitude.detach().contiguous()
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, directory / PEFT_WEIGHTS_FILE)
    peft_config = {
        "peft_type": "LORA", "task_type": None, "r": config.r, "lora_alpha": config.alpha,
        "lora_dropout": config.dropout, "use_rslora": config.rslora, "use_dora": isinstance(next(iter(layers.values())), DoRALayer),
        "target_modules": sorted(layers), "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True,
        "modules_to_save": None, "base_model_name_or_path": None,
    }  # fmt: skip
    (directory / PEFT_CONFIG_FILE).write_text(json.dumps(peft_config, indent=2))
    return directory


def _import_vera(model: nn.Module, meta: dict[str, Any], raw: dict[str, torch.Tensor], exclude: tuple[str, ...]) -> list[str]:
    if "base_model.vera_A" not in raw:
        raise AdapterConfigError("this PEFT VeRA adapter was saved without its projections (save_projection=False).")
    config = VeRAConfig(r=int(meta["r"]), d_initial=float(meta.get("d_initial", 0.1)),
                        seed=int(meta.get("projection_prng_key", 0)), dropout=float(meta.get("vera_dropout", 0.0)))  # fmt: skip
    vera_a, vera_b = raw.pop("base_model.vera_A"), raw.pop("base_model.vera_B")
    tensors: dict[str, torch.Tensor] = {}
    for key, value in raw.items():
        name = key.removeprefix("base_model.model.")
        tensors[name.replace(".vera_lambda_b", ".lambda_b").replace(".vera_lambda_d", ".lambda_d")] = value
    targets = sorted({k.rpartition(".")[0] for k in tensors})
    inject_adapters(model, config, targets, exclude=exclude)
    for name, layer in adapter_layers(model).items():
        tensors[f"{name}.vera_A"] = vera_a[:, : layer.in_features]
        tensors[f"{name}.vera_B"] = vera_b[: layer.out_features]
    _load_into(model, tensors)
    return targets


def import_peft(model: nn.Module, directory: str | Path, exclude: tuple[str, ...] = ()) -> list[str]:
    """Inject and load a PEFT LoRA/DoRA adapter directory into ``model``."""
    from lightning_qlora.adapters.dora import DoRAConfig

    directory = Path(directory)
    meta = _read_json(directory / PEFT_CONFIG_FILE)
    peft_type = meta.get("peft_type")
    if peft_type == "LORA":
        cls = DoRAConfig if meta.get("use_dora") else LoRAConfig
        config = cls(r=int(meta["r"]), alpha=float(meta["lora_alpha"]), dropout=float(meta.get("lora_dropout", 0.0)),
                     rslora=bool(meta.get("use_rslora", False)))  # fmt: skip
    elif peft_type == "VERA":
        return _import_vera(model, meta, _read_weights(directory / PEFT_WEIGHTS_FILE), exclude)
    elif peft_type == "ADALORA" and not meta.get("rank_pattern"):
        config = AdaLoRAConfig(r=int(meta["init_r"]), alpha=float(meta["lora_alpha"]),
                               dropout=float(meta.get("lora_dropout", 0.0)),
                               orth_reg_weight=float(meta.get("orth_reg_weight", 0.5)))  # fmt: skip
    else:
        raise AdapterConfigError(
            f"PEFT adapter type {peft_type!r} (rank_pattern={bool(meta.get('rank_pattern'))}) cannot be imported; "
            "supported: LORA (incl. DoRA), VERA and unpruned-layout ADALORA."
        )
    raw = _read_weights(directory / PEFT_WEIGHTS_FILE)
    tensors: dict[str, torch.Tensor] = {}
    for key, value in raw.items():
        name = key.removeprefix("base_model.model.")
        name = name.replace(".lora_A.weight", ".lora_A").replace(".lora_B.weight", ".lora_B")
        name = name.replace(".lora_magnitude_vector", ".lora_magnitude")
        if name.endswith(".lora_E"):  # PEFT keeps (r, 1); pruned ranks arrive as zeros, so all stay active
            tensors[name] = value.squeeze(1)
            tensors[name.removesuffix("lora_E") + "rank_mask"] = torch.ones_like(value.squeeze(1))
        else:
            tensors[name] = value
    targets = sorted({k.rpartition(".")[0] for k in tensors})
    inject_adapters(model, config, targets, exclude=exclude)
    _load_into(model, tensors)
    return targets
