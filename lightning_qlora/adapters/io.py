"""Save and load adapters on their own, and exchange them with PEFT.

Our format (a directory): ``adapter.safetensors`` (the adapters' own tensors, keyed
``<layer>.<param>``, as each layer's ``adapter_state_dict()`` and ``model_state()`` give them:
Delta-LoRA includes the base layers it moved, LoRA-drop the adapters its dropped layers share)
and ``adapter.json`` (``{"format": "lightning_qlora", "config": {...}, "targets": [...]}``).
Frozen random tensors regenerated from a seed (VeRA's projections) are not saved. Loading
checks the method, the targets and every shape, and raises
:class:`~lightning_qlora.adapters.AdapterConfigError` naming what does not fit.

PEFT's layout (``adapter_config.json`` + ``adapter_model.safetensors`` with keys
``base_model.model.<layer>.lora_A.weight``...) is written from each layer's ``peft_state()``:
LoRA, LoRA+, LoRA-FA, LoRA-drop (the pair each layer really uses) and DoRA as PEFT ``LORA``,
AdaLoRA (pruned ranks as zero singular values, which gives the same outputs) and VeRA (with the
projections saved). Methods PEFT does not have (Delta-LoRA, the mixture) are refused with a
:class:`~lightning_qlora.adapters.CapabilityError` that names the alternative.
Import covers PEFT's LoRA/DoRA (incl. ``rank_pattern``/``alpha_pattern`` are refused unless
uniform), AdaLoRA (also pruned, with ``rank_pattern``) and VeRA (saved with its projections).

Both directories are written atomically (:func:`lightning_qlora.atomic.atomic_directory`): a
reader, or a crash at any moment, sees the complete old adapter or the complete new one.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from torch import nn

from lightning_qlora.adapters.adalora import AdaLoRAConfig
from lightning_qlora.adapters.base import AdapterConfigError, AdapterLayer, CapabilityError, PeftState
from lightning_qlora.adapters.dora import DoRAConfig
from lightning_qlora.adapters.inject import adapter_layers, inject_adapters
from lightning_qlora.adapters.lora import LoRAConfig
from lightning_qlora.adapters.registry import config_differences, config_from_dict, config_to_dict
from lightning_qlora.adapters.vera import VeRAConfig
from lightning_qlora.atomic import atomic_directory, atomic_save_safetensors, atomic_write_text, read_directory
from lightning_qlora.errors import FileFormatError

CONFIG_FILE, WEIGHTS_FILE = "adapter.json", "adapter.safetensors"
PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."


class AdapterFileError(FileFormatError, AdapterConfigError):
    """An adapter directory is missing, damaged, or not an adapter of a kind we read."""


@dataclass(frozen=True)
class AdapterFiles:
    """A validated adapter directory as read from disk.

    Attributes:
        format: ``"lightning_qlora"`` (ours) or ``"peft"``.
        directory: where it was read from.
        meta: the parsed ``adapter.json`` / ``adapter_config.json``.
        tensors: every tensor of the weights file, keyed as in the file.
    """

    format: str
    directory: Path
    meta: dict[str, Any]
    tensors: dict[str, torch.Tensor]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as error:
        raise AdapterFileError(f"{path} does not exist; is this an adapter directory?") from error
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise AdapterFileError(f"{path} is not valid JSON ({error}); the adapter file is damaged.") from error
    if not isinstance(data, dict):
        raise AdapterFileError(
            f"{path} holds a JSON {type(data).__name__}, not an object; the adapter file is damaged."
        )
    return data


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_safetensors_bytes(path.read_bytes())
    except FileNotFoundError as error:
        raise AdapterFileError(f"adapter weights {path} do not exist; the adapter directory is incomplete.") from error
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise AdapterFileError(
            f"cannot read adapter weights {path} ({error}); the file is truncated or damaged: save the adapter again."
        ) from error


def _require(meta: dict[str, Any], path: Path, *keys: str) -> None:
    missing = [key for key in keys if key not in meta]
    if missing:
        raise AdapterFileError(f"{path} lacks the required field(s) {missing}; the adapter config is incomplete.")


def read_adapter_files(directory: str | Path) -> AdapterFiles:
    """Read and validate an adapter directory, ours or PEFT's, without touching any model.

    Raises:
        AdapterFileError: a missing directory or file, invalid JSON, a truncated or damaged weights
            file, or a config without its required fields (ours: ``config.method``, ``config.r``,
            ``targets``; PEFT's: ``peft_type`` and ``r``/``init_r`` and ``lora_alpha`` where the type has them).
    """
    directory = Path(directory)
    with _reading(directory) as root:
        if (root / CONFIG_FILE).exists():
            meta = _read_json(root / CONFIG_FILE)
            if meta.get("format") != "lightning_qlora":
                raise AdapterFileError(f'{root / CONFIG_FILE} is not a lightning_qlora adapter config (no "format").')
            _require(meta, root / CONFIG_FILE, "config", "targets")
            if not isinstance(meta["config"], dict) or not isinstance(meta["targets"], list):
                raise AdapterFileError(f'{root / CONFIG_FILE}: "config" must be an object and "targets" a list.')
            _require(meta["config"], root / CONFIG_FILE, "method", "r")
            config_from_dict(meta["config"])  # unknown methods or fields fail before the weights are read
            return AdapterFiles("lightning_qlora", directory, meta, _read_weights(root / WEIGHTS_FILE))
        if (root / PEFT_CONFIG_FILE).exists():
            meta = _read_json(root / PEFT_CONFIG_FILE)
            _require(meta, root / PEFT_CONFIG_FILE, "peft_type")
            required = {"LORA": ("r", "lora_alpha"), "ADALORA": ("init_r", "lora_alpha"), "VERA": ("r",)}
            _require(meta, root / PEFT_CONFIG_FILE, *required.get(meta["peft_type"], ()))
            return AdapterFiles("peft", directory, meta, _read_weights(root / PEFT_WEIGHTS_FILE))
    raise AdapterFileError(
        f"{directory} holds neither {CONFIG_FILE} (ours) nor {PEFT_CONFIG_FILE} (PEFT): it is not an adapter directory."
    )


class _reading:
    """``read_directory`` with our error for a missing directory."""

    def __init__(self, directory: Path) -> None:
        self._directory, self._context = directory, read_directory(directory)

    def __enter__(self) -> Path:
        try:
            return self._context.__enter__()
        except FileNotFoundError as error:
            raise AdapterFileError(f"adapter directory {self._directory} does not exist.") from error

    def __exit__(self, *exc: Any) -> None:
        self._context.__exit__(*exc)


# -- our format -------------------------------------------------------------------------------


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' own tensors, keyed ``<layer>.<param>`` (and model-held ones from the model root)."""
    out: dict[str, torch.Tensor] = {}
    for name, layer in adapter_layers(model).items():
        out.update({f"{name}.{key}": value.detach().contiguous() for key, value in layer.adapter_state_dict().items()})
        out.update({key: value.detach().contiguous() for key, value in layer.model_state(model).items()})
    return out


def _write_directory(directory: Path, files: dict[str, Any]) -> Path:
    """Atomically replace our files in ``directory`` (any other file in it is kept)."""
    with atomic_directory(directory) as tmp:
        if directory.is_dir():
            for entry in directory.iterdir():
                if entry.name in files:
                    continue
                if entry.is_dir():
                    shutil.copytree(entry, tmp / entry.name, symlinks=True)
                else:
                    shutil.copy2(entry, tmp / entry.name, follow_symlinks=False)
        for name, content in files.items():
            if isinstance(content, str):
                atomic_write_text(tmp / name, content)
            else:
                atomic_save_safetensors(content, tmp / name)
    return directory


def _one_method(layers: dict[str, AdapterLayer], what: str) -> AdapterLayer:
    if not layers:
        raise AdapterConfigError(f"the model has no adapters to {what}; call inject_adapters first.")
    methods = sorted({layer.config.method for layer in layers.values()})
    if len(methods) != 1:
        raise AdapterConfigError(f"{what} handles one adapter method per directory, found {methods}.")
    return next(iter(layers.values()))


def save_adapters(model: nn.Module, directory: str | Path) -> Path:
    """Write the model's adapters (one method) to ``directory`` atomically; returns it."""
    layers = adapter_layers(model)
    first = _one_method(layers, "save_adapters")
    meta = {"format": "lightning_qlora", "config": config_to_dict(first.config), "targets": list(layers)}
    tensors = adapter_state_dict(model)
    return _write_directory(Path(directory), {WEIGHTS_FILE: tensors, CONFIG_FILE: json.dumps(meta, indent=2)})


def _load_into(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Check ``tensors`` against the model's adapters (names and shapes), then load them."""
    layers = adapter_layers(model)
    for name, layer in layers.items():
        layer.prepare_load(model, name, tensors)
    own = adapter_state_dict(model)
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    if missing or unexpected:
        raise AdapterConfigError(
            f"adapter weights do not fit this model: missing {missing[:5]}, unexpected {unexpected[:5]}."
        )
    for key, value in tensors.items():
        if value.shape != own[key].shape and ".quant_state." not in key:  # that one is a JSON byte string
            raise AdapterConfigError(
                f"adapter tensor {key!r} has shape {tuple(value.shape)} but this model needs {tuple(own[key].shape)}; "
                "was it trained on another model or rank?"
            )
    by_root = {name: layer for name, layer in layers.items()}
    with torch.no_grad():
        for name, layer in by_root.items():
            prefix = name + "."
            layer.load_state_dict(
                {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}, strict=False
            )
        model_held = {k: v for k, v in tensors.items() if not any(k.startswith(n + ".") for n in by_root)}
        if model_held:
            model.load_state_dict(model_held, strict=False)


def load_adapters(model: nn.Module, directory: str | Path, expected_method: str | None = None) -> list[str]:
    """Inject the saved adapters into ``model`` (if not already there) and load their weights.

    Everything is read and checked first: a damaged or mismatching directory raises and leaves
    ``model`` as it was.
    """
    files = read_adapter_files(directory)
    if files.format != "lightning_qlora":
        raise AdapterFileError(f"{directory} is a PEFT adapter; load it with lightning_qlora.adapters.import_peft.")
    config = config_from_dict(files.meta["config"], expected_method)
    targets = list(files.meta["targets"])
    present = adapter_layers(model)
    if present and sorted(present) != sorted(targets):
        raise AdapterConfigError(f"the model's adapters {sorted(present)[:5]} are not the saved ones {targets[:5]}.")
    differences = sorted({d for layer in present.values() for d in config_differences(config, layer.config)})
    if differences:
        raise AdapterConfigError(
            f"the model's adapters differ from the ones saved in {directory}: {'; '.join(differences)}. "
            "Load into a model without adapters (they are then injected as saved), or inject the saved config."
        )
    if not present:
        _inject_then_load(model, config, targets, (), files.tensors)
    else:
        _load_into(model, files.tensors)
    return targets


def _inject_then_load(
    model: nn.Module, config: Any, targets: list[str], exclude: tuple[str, ...], tensors: dict[str, torch.Tensor]
) -> None:
    """Inject and load; on a mismatch the injected adapters are taken off again (the model is unchanged)."""
    originals = {name: model.get_submodule(name) for name in targets if _has_module(model, name)}
    flags = [(parameter, parameter.requires_grad) for parameter in model.parameters()]
    inject_adapters(model, config, targets, exclude=exclude)
    try:
        _load_into(model, tensors)
    except BaseException:
        for name, original in originals.items():
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, original)
        for parameter, flag in flags:
            parameter.requires_grad_(flag)
        raise


def _has_module(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


# -- PEFT's layout ----------------------------------------------------------------------------


def _merge_shared(shared: dict[str, torch.Tensor], name: str, key: str, tensor: torch.Tensor) -> None:
    current = shared.get(key)
    if current is None or tensor.numel() > current.numel():
        current, tensor = tensor, current
        shared[key] = current
    if tensor is None:
        return
    if tensor.dim() != current.dim() or any(s > c for s, c in zip(tensor.shape, current.shape, strict=True)):
        raise AdapterConfigError(
            f"layer {name!r} brings a shared tensor {key!r} of shape {tuple(tensor.shape)} that "
            f"does not fit the other layers' {tuple(current.shape)}."
        )
    if not torch.equal(current[tuple(slice(0, s) for s in tensor.shape)], tensor):
        raise AdapterConfigError(
            f"layer {name!r} brings a shared tensor {key!r} that differs from the other layers'; "
            "their adapters were not made with one seed."
        )


def peft_export_state(model: nn.Module) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(adapter_config, tensors)`` of the model's adapters in PEFT's layout (nothing written).

    Raises:
        CapabilityError: a layer's method has no PEFT equivalent (the message names the alternative).
        AdapterConfigError: no adapters, or layers whose PEFT settings disagree.
    """
    layers = adapter_layers(model)
    _one_method(layers, "export_peft")
    config: dict[str, Any] = {}
    tensors: dict[str, torch.Tensor] = {}
    shared: dict[str, torch.Tensor] = {}
    for name, layer in layers.items():
        state: PeftState = layer.peft_state(name)
        for key, value in state.config.items():
            if key in ("rank_pattern", "alpha_pattern") and isinstance(value, dict):
                config.setdefault(key, {}).update(value)
            elif config.setdefault(key, value) != value:
                raise AdapterConfigError(
                    f"layer {name!r} needs PEFT {key}={value!r} but other layers need {config[key]!r}; PEFT's layout "
                    "holds one value per adapter."
                )
        # cloned: layers sharing one pair (LoRA-drop) must still be separate tensors in the file
        tensors.update({f"{_PEFT_PREFIX}{name}.{key}": value.detach().clone() for key, value in state.tensors.items()})
        for key, value in state.shared.items():
            _merge_shared(shared, name, key, value)
    tensors.update({f"base_model.{key}": value.contiguous() for key, value in shared.items()})
    config.update(
        {
            "task_type": None,
            "target_modules": sorted(layers),
            "bias": "none",
            "fan_in_fan_out": False,
            "modules_to_save": None,
            "base_model_name_or_path": None,
        }
    )
    config.setdefault("init_lora_weights" if config.get("peft_type") != "VERA" else "init_weights", True)
    return config, tensors


def export_peft(model: nn.Module, directory: str | Path) -> Path:
    """Write the model's adapters in PEFT's layout (``PeftModel.from_pretrained`` loads it), atomically.

    Everything is computed before anything is written: a refused method leaves ``directory`` as it was.
    """
    config, tensors = peft_export_state(model)
    files = {PEFT_WEIGHTS_FILE: tensors, PEFT_CONFIG_FILE: json.dumps(config, indent=2)}
    return _write_directory(Path(directory), files)


def _peft_name(key: str) -> str:
    return key.removeprefix(_PEFT_PREFIX)


def _import_vera(meta: dict[str, Any], raw: dict[str, torch.Tensor]) -> tuple[Any, dict[str, torch.Tensor]]:
    if "base_model.vera_A" not in raw or "base_model.vera_B" not in raw:
        raise AdapterFileError("this PEFT VeRA adapter was saved without its projections (save_projection=False).")
    config = VeRAConfig(
        r=int(meta["r"]),
        d_initial=float(meta.get("d_initial", 0.1)),
        seed=int(meta.get("projection_prng_key", 0)),
        dropout=float(meta.get("vera_dropout", 0.0)),
    )
    raw = dict(raw)
    vera_a, vera_b = raw.pop("base_model.vera_A"), raw.pop("base_model.vera_B")
    tensors: dict[str, torch.Tensor] = {}
    for key, value in raw.items():
        name = _peft_name(key).replace(".vera_lambda_b", ".lambda_b").replace(".vera_lambda_d", ".lambda_d")
        tensors[name] = value
    # the projections are sliced per layer once the layer shapes are known (see _vera_projections)
    tensors["\0vera_A"], tensors["\0vera_B"] = vera_a, vera_b
    return config, tensors


def _import_adalora(meta: dict[str, Any], raw: dict[str, torch.Tensor]) -> tuple[Any, dict[str, torch.Tensor]]:
    config = AdaLoRAConfig(
        r=int(meta["init_r"]),
        alpha=float(meta["lora_alpha"]),
        dropout=float(meta.get("lora_dropout", 0.0)),
        orth_reg_weight=float(meta.get("orth_reg_weight", 0.5)),
    )
    tensors: dict[str, torch.Tensor] = {}
    for key, value in raw.items():
        name = _peft_name(key)
        if not name.endswith(".lora_E"):
            continue
        layer = name.removesuffix(".lora_E")
        lora_a, lora_b = raw.get(f"{_PEFT_PREFIX}{layer}.lora_A"), raw.get(f"{_PEFT_PREFIX}{layer}.lora_B")
        if lora_a is None or lora_b is None:
            raise AdapterFileError(f"PEFT AdaLoRA adapter: layer {layer!r} has lora_E but lacks lora_A or lora_B.")
        kept = value.reshape(-1).shape[0]
        if kept > config.r or lora_a.shape[0] != kept or lora_b.shape[1] != kept:
            raise AdapterFileError(
                f"PEFT AdaLoRA adapter: layer {layer!r} has ranks E={kept}, A={lora_a.shape[0]}, B={lora_b.shape[1]} "
                f"(init_r={config.r}); the file is inconsistent."
            )
        # A pruned adapter (rank_pattern) holds only the ``kept`` triplets; PEFT still divides by init_r when it
        # reloads one (pinned against PEFT in the tests), so we keep init_r slots with the pruned ones masked.
        pad = config.r - kept
        tensors[f"{layer}.lora_E"] = torch.cat([value.reshape(-1).float(), value.new_zeros(pad).float()])
        tensors[f"{layer}.lora_A"] = torch.cat([lora_a.float(), lora_a.new_zeros(pad, lora_a.shape[1]).float()])
        tensors[f"{layer}.lora_B"] = torch.cat([lora_b.float(), lora_b.new_zeros(lora_b.shape[0], pad).float()], dim=1)
        tensors[f"{layer}.rank_mask"] = torch.cat([torch.ones(kept), torch.zeros(pad)])
    return config, tensors


def _import_lora(meta: dict[str, Any], raw: dict[str, torch.Tensor]) -> tuple[Any, dict[str, torch.Tensor]]:
    for pattern in ("rank_pattern", "alpha_pattern"):
        if meta.get(pattern):
            raise AdapterFileError(
                f"this PEFT LoRA adapter sets {pattern}={meta[pattern]!r} (per-layer ranks or alphas), which our "
                "adapters hold as one value per model; it can still be served (lightning-qlora serve)."
            )
    cls = DoRAConfig if meta.get("use_dora") else LoRAConfig
    config = cls(
        r=int(meta["r"]),
        alpha=float(meta["lora_alpha"]),
        dropout=float(meta.get("lora_dropout", 0.0)),
        rslora=bool(meta.get("use_rslora", False)),
    )
    tensors = {}
    for key, value in raw.items():
        name = _peft_name(key).replace(".lora_A.weight", ".lora_A").replace(".lora_B.weight", ".lora_B")
        tensors[name.replace(".lora_magnitude_vector", ".lora_magnitude")] = value
    return config, tensors


_PEFT_IMPORTERS = {"LORA": _import_lora, "ADALORA": _import_adalora, "VERA": _import_vera}


def import_peft(model: nn.Module, directory: str | Path, exclude: tuple[str, ...] = ()) -> list[str]:
    """Inject and load a PEFT LoRA/DoRA, AdaLoRA (pruned too) or VeRA adapter directory into ``model``.

    The directory is read and checked first; on any error ``model`` is left as it was.
    """
    files = read_adapter_files(directory)
    if files.format != "peft":
        raise AdapterFileError(
            f"{directory} is one of our adapters; load it with lightning_qlora.adapters.load_adapters."
        )
    peft_type = files.meta.get("peft_type")
    importer = _PEFT_IMPORTERS.get(peft_type)
    if importer is None:
        raise AdapterFileError(
            f"PEFT adapter type {peft_type!r} cannot be imported; supported: {sorted(_PEFT_IMPORTERS)}."
        )
    config, tensors = importer(files.meta, files.tensors)
    vera = (tensors.pop("\0vera_A", None), tensors.pop("\0vera_B", None))
    targets = sorted({key.rpartition(".")[0] for key in tensors})
    if vera[0] is not None:
        for name in targets:
            base = model.get_submodule(name) if _has_module(model, name) else None
            if base is None:
                break
            tensors[f"{name}.vera_A"] = vera[0][:, : base.in_features]
            tensors[f"{name}.vera_B"] = vera[1][: base.out_features]
    _inject_then_load(model, config, targets, exclude, tensors)
    return targets


__all__ = [
    "AdapterFileError",
    "AdapterFiles",
    "CapabilityError",
    "adapter_state_dict",
    "export_peft",
    "import_peft",
    "load_adapters",
    "peft_export_state",
    "read_adapter_files",
    "save_adapters",
]
