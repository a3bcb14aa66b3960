"""A transformers causal LM with its parameters on the meta device, and the map from checkpoint keys to them.

The skeleton is the real model class built from ``config.json`` with every *parameter* on the
meta device (no memory) while buffers stay real: non-persistent buffers such as RoPE's
``inv_freq`` are computed in ``__init__`` and are not in checkpoints, so they must survive
(accelerate's ``init_empty_weights(include_buffers=False)`` does the same; we do not depend on it).

Checkpoint keys are mapped to parameter names the way ``from_pretrained`` maps them: the
renamings transformers registers for the architecture (its ``conversion_mapping``, e.g. legacy
``LayerNorm.gamma``) and adding or dropping the base-model prefix (``model.``). Conversions that
change tensors (MoE expert fusion...) are refused with a typed error rather than loaded wrong.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_qlora.models.checkpoint import CheckpointLayout
from lightning_qlora.models.errors import CheckpointFileError, UnsupportedArchitectureError

#: The families the test suite pins (any causal LM whose checkpoint keys are plain renames loads).
TESTED_FAMILIES = ("llama", "qwen2", "mistral", "gemma2", "gemma3_text", "phi3")


def read_config(directory: Path, trust_remote_code: bool = False) -> Any:
    """``AutoConfig`` of ``directory``, offline; typed errors for a missing or unknown config."""
    from transformers import AutoConfig

    config_file = directory / "config.json"
    if not config_file.is_file():
        raise CheckpointFileError(
            f"{directory} has no config.json; a model directory is what save_pretrained writes "
            "(config.json, *.safetensors, tokenizer files)."
        )
    try:
        return AutoConfig.from_pretrained(directory, trust_remote_code=trust_remote_code, local_files_only=True)
    except (ValueError, KeyError) as error:
        raise UnsupportedArchitectureError(
            f"{config_file} describes an architecture transformers does not know ({error}). Use a causal LM "
            f"transformers ships (tested: {', '.join(TESTED_FAMILIES)}), or pass trust_remote_code=True for a model "
            "whose own code is in the directory."
        ) from None


def check_causal_lm(config: Any, config_file: Path) -> None:
    """Raise :class:`UnsupportedArchitectureError` unless ``AutoModelForCausalLM`` can build ``config``."""
    from transformers import AutoModelForCausalLM

    remote = "AutoModelForCausalLM" in (getattr(config, "auto_map", None) or {})
    if remote or type(config) in AutoModelForCausalLM._model_mapping:
        return
    raise UnsupportedArchitectureError(
        f"{config_file} is a {type(config).__name__} (model_type={config.model_type!r}), which has no causal-LM "
        f"head in transformers: load_causal_lm fine-tunes decoder LMs (tested: {', '.join(TESTED_FAMILIES)}; any "
        "model AutoModelForCausalLM builds). Point model.path at a causal LM checkpoint."
    )


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Inside, every parameter a module registers moves to the meta device; buffers stay where they are.

    ``torch.empty`` of a weight is allocated for an instant and never touched, so it costs no
    resident memory; its initialization then runs on the meta copy (a no-op).
    """
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = type(param)(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register_on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def build_skeleton(config: Any, dtype: torch.dtype, trust_remote_code: bool = False) -> nn.Module:
    """The model class of ``config`` with meta parameters of ``dtype`` (and real buffers)."""
    from transformers import AutoModelForCausalLM

    with parameters_on_meta():
        return AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)


@dataclass(frozen=True)
class KeyPlan:
    """What to do with each checkpoint key.

    Attributes:
        targets: checkpoint key -> parameter/buffer name in the model.
        ignored: checkpoint keys the model has no slot for (transformers ignores them too).
        tied: parameter names that alias another parameter (filled by ``tie_weights``).
    """

    targets: dict[str, str]
    ignored: list[str]
    tied: dict[str, str]


def _renamer(model: nn.Module, slots: dict[str, Any]) -> Any:
    """``key -> (name, needs_conversion)`` as transformers' loader renames checkpoint keys."""
    prefix = getattr(model, "base_model_prefix", "") or None
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
    except ImportError:  # transformers 4.x: legacy renames and the base-model prefix only
        legacy = [
            (re.compile(r"LayerNorm\.gamma$"), "LayerNorm.weight"),
            (re.compile(r"LayerNorm\.beta$"), "LayerNorm.bias"),
        ]

        def rename_4x(key: str) -> tuple[str, bool]:
            for pattern, replacement in legacy:
                key = pattern.sub(replacement, key)
            if prefix and key not in slots:
                if key.startswith(prefix + ".") and key[len(prefix) + 1 :] in slots:
                    key = key[len(prefix) + 1 :]
                elif f"{prefix}.{key}" in slots:
                    key = f"{prefix}.{key}"
            return key, False

        return rename_4x
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]

    def rename_5x(key: str) -> tuple[str, bool]:
        name, converter = rename_source_key(key, renamings, converters, prefix, slots)
        return name, converter is not None

    return rename_5x


def tied_parameters(model: nn.Module) -> dict[str, str]:
    """``alias -> source`` for parameters the model shares (tied embeddings), as built."""
    first: dict[int, str] = {}
    tied: dict[str, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first:
            tied[name] = first[id(param)]
        else:
            first[id(param)] = name
    for alias, source in (getattr(model, "all_tied_weights_keys", None) or {}).items():
        tied.setdefault(alias, source)
    return tied


def plan_keys(model: nn.Module, layout: CheckpointLayout) -> KeyPlan:
    """Map every checkpoint key to a model slot and check every slot gets a tensor of its shape.

    Raises:
        UnsupportedArchitectureError: a key needs a tensor conversion (fusion, split) on load.
        CheckpointFileError: a parameter missing from the checkpoint, or a shape mismatch.
    """
    slots = model.state_dict(keep_vars=True)
    tied = tied_parameters(model)
    rename = _renamer(model, slots)
    ignore = [re.compile(p) for p in (getattr(model, "_keys_to_ignore_on_load_unexpected", None) or [])]
    targets: dict[str, str] = {}
    ignored: list[str] = []
    for key, info in layout.tensors.items():
        name, needs_conversion = rename(key)
        if needs_conversion:
            raise UnsupportedArchitectureError(
                f"checkpoint key {key!r} ({layout.directory}) needs a tensor conversion on load "
                f"({type(model).__name__}: e.g. fused experts) that the streaming loader does not do. Load it with "
                "AutoModelForCausalLM.from_pretrained and quantize it with NF4Precision instead."
            )
        if name in tied:  # the alias of a tied weight: the source's tensor fills it
            continue
        if name not in slots or any(p.search(key) for p in ignore):
            ignored.append(key)
            continue
        expected = tuple(slots[name].shape)
        if info.shape != expected:
            raise CheckpointFileError(
                f"checkpoint tensor {key!r} has shape {info.shape} but the model built from config.json expects "
                f"{expected} for {name!r}; config.json and the weights in {layout.directory} do not match."
            )
        targets[key] = name
    # persistent buffers are real already (computed in __init__); only meta parameters need a tensor
    loaded = set(targets.values())
    missing = sorted(n for n, t in slots.items() if t.device.type == "meta" and n not in loaded and n not in tied)
    if missing:
        raise CheckpointFileError(
            f"the checkpoint in {layout.directory} has no tensor for {len(missing)} model weight(s), e.g. "
            f"{', '.join(missing[:5])}; the shards are incomplete or belong to another config.json."
        )
    return KeyPlan(targets, ignored, tied)
