"""Checkpoints of plugin-converted models that any LightningModule can resume from, with no hook of its own.

Lightning restores a checkpoint's weights into the LightningModule *before* the strategy asks
the precision plugin to convert it, so a fresh (float) module would meet 4-bit weights and
adapter tensors and fail with torch's key dump. The plugin therefore saves what each moment of
a resume needs:

* ``checkpoint["state_dict"]`` in the layout the module has *when Lightning restores it*. For a
  module the plugin converted in ``convert_module`` (the model was built in ``__init__``), that is
  the float model's layout: every key of the float model, with a 1-element NaN placeholder
  broadcast to the shape of each converted Linear weight (so it costs nothing on disk and a
  float model loaded from it without the plugin is visibly broken, never silently). For a
  module converted at construction (built in ``configure_model`` or ``fabric.init_module()``)
  it is the converted layout itself.
* ``checkpoint["lightning_qlora"]``: the QLoRA spec the run used (mode, blocksize, adapter
  config, the adapted and quantized layers) and, for the float layout, the converted module's
  real state (4-bit bases, adapters, LoRA-drop's shared pairs, moved Delta-LoRA bases). The
  plugin's ``convert_module`` checks the spec against its own -- a difference raises
  :class:`CheckpointMismatchError` naming both values and the override that resumes -- then
  converts and loads that state before the optimizers are built, so optimizer state, LoRA-drop's
  stage-2 structure and everything else resume exactly.

Adapters-only checkpoints (:func:`keep_only_adapters`) keep just the adapter tensors; the base is
re-quantized from the float model, deterministically, after the same spec check.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from lightning_qlora.adapters import AdapterLayer, adapter_layers
from lightning_qlora.adapters.io import adapter_state_dict
from lightning_qlora.adapters.registry import config_differences, config_from_dict, config_to_dict
from lightning_qlora.errors import ConfigError, FileFormatError
from lightning_qlora.qlora import QLoRAReport, QLoRASpec
from lightning_qlora.quantization.linear import Linear4bit

#: top-level checkpoint key of the plugin's record
STASH_KEY = "lightning_qlora"
_FORMAT_VERSION = 1


class CheckpointMismatchError(ConfigError):
    """A checkpoint was trained with other QLoRA settings (mode, adapter, layers) than this run uses."""


class CheckpointStashError(FileFormatError):
    """The plugin's record in a checkpoint is damaged or from an unknown format version."""


def spec_record(spec: QLoRASpec, report: QLoRAReport) -> dict[str, Any]:
    """What a checkpoint records of the run's QLoRA settings (plain types only, for ``weights_only`` loading)."""
    return {
        "mode": spec.mode,
        "blocksize": spec.blocksize,
        "adapter": None if spec.adapter is None else config_to_dict(spec.adapter),
        "skip_modules": list(spec.skip_modules),
        "adapted": list(report.adapted),
        "quantized": list(report.quantized),
    }


def _override(key: str, saved: Any) -> str:
    return f"{key}={saved!r}"


def check_spec(saved: Mapping[str, Any], spec: QLoRASpec, adapted: list[str] | None = None) -> None:
    """Raise :class:`CheckpointMismatchError` unless ``saved`` (a :func:`spec_record`) matches ``spec``.

    The message names every differing value (saved and here), the plugin arguments that load the
    checkpoint, and the app's command-line overrides.
    """
    try:
        mode, blocksize, adapter = saved["mode"], int(saved["blocksize"]), saved["adapter"]
        saved_config = None if adapter is None else config_from_dict(dict(adapter))
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointStashError(f"the checkpoint's {STASH_KEY!r} record is damaged ({error!r}).") from None
    problems: list[str] = []
    fixes: list[str] = []
    app: list[str] = []
    if mode != spec.mode:
        problems.append(f"mode: {mode!r} saved, {spec.mode!r} here")
        fixes.append(_override("mode", mode))
        app.append(f"quant={mode.replace('-', '_')}")
    if blocksize != spec.blocksize:
        problems.append(f"blocksize: {blocksize} saved, {spec.blocksize} here")
        fixes.append(_override("blocksize", blocksize))
        app.append(f"quant.blocksize={blocksize}")
    if (saved_config is None) != (spec.adapter is None):
        problems.append(
            f"adapter: {adapter!r} saved, {None if spec.adapter is None else config_to_dict(spec.adapter)!r} here"
        )
    elif saved_config is not None and spec.adapter is not None:
        differences = config_differences(saved_config, spec.adapter)
        problems.extend(f"adapter {d}" for d in differences)
        if differences:
            fields = ", ".join(f"{k}={v!r}" for k, v in config_to_dict(saved_config).items() if k != "method")
            fixes.append(f"adapter={type(saved_config).__name__}({fields})")
            if saved_config.method != spec.adapter.method:
                app.append(f"adapter={saved_config.method}")
            else:
                saved_fields, here = config_to_dict(saved_config), config_to_dict(spec.adapter)
                app.extend(f"adapter.{k}={v}" for k, v in saved_fields.items() if here.get(k) != v)
    if adapted is not None and not problems and sorted(saved.get("adapted", [])) != sorted(adapted):
        only_saved = sorted(set(saved.get("adapted", [])) - set(adapted))
        only_here = sorted(set(adapted) - set(saved.get("adapted", [])))
        problems.append(f"adapted layers: only in the checkpoint {only_saved[:4]}, only here {only_here[:4]}")
        fixes.append(
            f"target_modules={sorted(saved.get('adapted', []))[:4]}..., skip_modules={saved.get('skip_modules')}"
        )
    if problems:
        raise CheckpointMismatchError(
            "this checkpoint was trained with other QLoRA settings than this run: "
            + "; ".join(problems)
            + ". "
            + (
                f"Resume with NF4Precision({', '.join(fixes)})"
                if fixes
                else "Resume with the settings it was saved with"
            )
            + (f" (in the app: {' '.join(app)})." if app else ".")
        )


def _converted_prefixes(module: nn.Module) -> dict[str, nn.Module]:
    """``{prefix: layer}`` of every module the plugin replaced (adapter layers, bare 4-bit layers)."""
    found: dict[str, nn.Module] = {}
    for name, child in module.named_modules():
        if any(name.startswith(p) for p in found):
            continue
        if isinstance(child, (AdapterLayer, Linear4bit)) or getattr(child, "is_adapter_state", False):
            found[f"{name}." if name else ""] = child
    return found


def _placeholder(layer: nn.Module) -> torch.Tensor:
    base = layer.base if isinstance(layer, AdapterLayer) else layer
    dtype = base.weight.dtype if base.weight.dtype.is_floating_point else torch.float32
    return torch.full((), math.nan, dtype=dtype).expand(base.out_features, base.in_features)


def float_layout(module: nn.Module, state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """``state_dict`` (of the converted ``module``) in the layout of the float module it came from.

    Converted Linear weights become broadcast NaN placeholders; their biases and every other
    key of the float model are kept; adapter-only keys are left out.
    """
    prefixes = _converted_prefixes(module)
    out = {key: value for key, value in state_dict.items() if not any(key.startswith(p) for p in prefixes)}
    for prefix, layer in prefixes.items():
        if getattr(layer, "is_adapter_state", False):
            continue
        base = layer.base if isinstance(layer, AdapterLayer) else layer
        out[f"{prefix}weight"] = _placeholder(layer)
        if base.bias is not None:
            out[f"{prefix}bias"] = base.bias.detach()
    return out


def save_stash(checkpoint: dict[str, Any], module: nn.Module, record: dict[str, Any], float_built: bool) -> None:
    """Write the plugin's record into ``checkpoint`` (see the module docstring)."""
    stash: dict[str, Any] = {
        "version": _FORMAT_VERSION,
        "spec": record,
        "layout": "float" if float_built else "converted",
    }
    if float_built:
        state = checkpoint["state_dict"]
        stash["state_dict"] = dict(state)
        checkpoint["state_dict"] = float_layout(module, state)
    checkpoint[STASH_KEY] = stash


def keep_only_adapters(checkpoint: dict[str, Any], model: nn.Module, prefix: str) -> None:
    """Shrink ``checkpoint`` to the adapters of ``model`` (at ``prefix`` in the LightningModule) and the record."""
    adapters = {f"{prefix}{k}": v for k, v in adapter_state_dict(model).items()}
    # the same tensors in both places: torch.save stores them once; Lightning's non-strict restore of a
    # float module ignores them, and the plugin loads them from the record once the module is converted
    checkpoint["state_dict"] = dict(adapters)
    stash = checkpoint.setdefault(STASH_KEY, {"version": _FORMAT_VERSION})
    stash["layout"] = "adapters"
    stash["state_dict"] = adapters


def read_stash(checkpoint: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The plugin's record in ``checkpoint``, validated, or ``None`` if it has none."""
    if not checkpoint or STASH_KEY not in checkpoint:
        return None
    stash = checkpoint[STASH_KEY]
    if not isinstance(stash, dict) or stash.get("version") != _FORMAT_VERSION or "spec" not in stash:
        raise CheckpointStashError(
            f"the checkpoint's {STASH_KEY!r} record is damaged or from another lightning_qlora version "
            f"(version {stash.get('version') if isinstance(stash, dict) else None!r}, expected {_FORMAT_VERSION})."
        )
    if stash.get("layout") not in ("float", "converted", "adapters"):
        raise CheckpointStashError(
            f"the checkpoint's {STASH_KEY!r} record has an unknown layout {stash.get('layout')!r}."
        )
    return stash


def layers_replaced_by_stash(stash: Mapping[str, Any]) -> set[str]:
    """Layers whose float weights in the module are placeholders the stash replaces."""
    if stash.get("layout") != "float":
        return set()
    record = stash["spec"]
    return set(record.get("quantized", [])) | set(record.get("adapted", []))


def load_stash_state(module: nn.Module, stash: Mapping[str, Any]) -> None:
    """Load the stash's converted state into the (just converted) ``module``; typed errors on a mismatch."""
    state = stash.get("state_dict")
    if state is None:
        return
    adapters_only = stash["layout"] == "adapters"
    own = module.state_dict()
    for key, value in state.items():
        mine = own.get(key)
        if (
            mine is not None
            and isinstance(value, torch.Tensor)
            and value.shape != mine.shape
            and ".quant_state." not in key
        ):
            raise CheckpointMismatchError(
                f"checkpoint tensor {key!r} has shape {tuple(value.shape)}, this run's has {tuple(mine.shape)}: the run "
                "was configured differently (rank, layers or model); resume with the settings it was saved with."
            )
    result = module.load_state_dict(dict(state), strict=False)
    missing = [k for k in result.missing_keys if not adapters_only or _is_adapter_key(module, k)]
    unexpected = list(result.unexpected_keys)
    if missing or unexpected:
        raise CheckpointMismatchError(
            f"the checkpoint does not fit this run's converted model: missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}; resume with the settings it was saved with."
        )


def _is_adapter_key(module: nn.Module, key: str) -> bool:
    return any(key.startswith(f"{name}.") and not key.startswith(f"{name}.base.") for name in adapter_layers(module))


def loaded_checkpoint(module: nn.Module) -> dict[str, Any] | None:
    """The checkpoint the module's Trainer is resuming from, while it resumes (else ``None``).

    Lightning keeps it on its checkpoint connector from loading until the training state is
    restored, which spans the strategy's setup (where the plugin converts the module).
    """
    trainer = getattr(module, "_trainer", None)
    connector = getattr(trainer, "_checkpoint_connector", None)
    checkpoint = getattr(connector, "_loaded_checkpoint", None)
    return checkpoint if isinstance(checkpoint, dict) and checkpoint else None
