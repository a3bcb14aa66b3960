"""Read a LoRA adapter directory -- ours or PEFT's -- into plain factors for serving.

Our format (``adapter.json`` + ``adapter.safetensors``, see :mod:`lightning_qlora.adapters.io`)
is served for the methods whose update is ``scale * B A`` at inference: LoRA, LoRA+ and LoRA-FA.
PEFT's layout (``adapter_config.json`` + ``adapter_model.safetensors``) is served for plain
``LORA`` adapters, including per-module ``rank_pattern`` / ``alpha_pattern`` and rsLoRA.
Anything else (DoRA, VeRA, AdaLoRA, ...) raises :class:`AdapterFormatError` saying so.

Example:
    >>> factors = read_lora_factors("adapters/support-bot")
    >>> factors.modules["model.layers.0.self_attn.q_proj"].rank
    16
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from lightning_qlora.adapters.io import CONFIG_FILE, PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE, WEIGHTS_FILE

#: Methods of our format whose inference-time update is exactly ``scale * B @ A``.
SERVABLE_METHODS = ("lora", "lora_plus", "lora_fa")


class AdapterFormatError(ValueError):
    """An adapter directory cannot be served; the message says what is wrong with it."""


@dataclass(frozen=True)
class LoRAModuleFactors:
    """One adapted layer: ``delta(x) = scale * x @ A^T @ B^T``.

    Attributes:
        lora_A: ``(r, in)`` float32.
        lora_B: ``(out, r)`` float32.
        scale: ``alpha / r`` (or ``alpha / sqrt(r)`` with rsLoRA).
    """

    lora_A: torch.Tensor
    lora_B: torch.Tensor
    scale: float

    @property
    def rank(self) -> int:
        return self.lora_A.shape[0]


@dataclass(frozen=True)
class LoRAFactors:
    """All adapted layers of one adapter, keyed by the base model's qualified module name."""

    modules: dict[str, LoRAModuleFactors]

    @property
    def max_rank(self) -> int:
        return max(m.rank for m in self.modules.values())


def is_adapter_dir(path: Path) -> bool:
    """Whether ``path`` holds an adapter in our format or PEFT's."""
    return (path / CONFIG_FILE).is_file() or (path / PEFT_CONFIG_FILE).is_file()


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
        raise AdapterFormatError(f"cannot read adapter config {path}: {error}") from error


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except (OSError, SafetensorError) as error:
        raise AdapterFormatError(f"cannot read adapter weights {path}: {error}") from error


def _factors(lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float, name: str) -> LoRAModuleFactors:
    if lora_A.dim() != 2 or lora_B.dim() != 2 or lora_A.shape[0] != lora_B.shape[1]:
        raise AdapterFormatError(
            f"{name}: lora_A {tuple(lora_A.shape)} and lora_B {tuple(lora_B.shape)} are not (r, in) and (out, r)."
        )
    return LoRAModuleFactors(lora_A.float().contiguous(), lora_B.float().contiguous(), float(scale))


def _read_ours(directory: Path) -> LoRAFactors:
    meta = _read_json(directory / CONFIG_FILE)
    config = meta.get("config", {})
    method = config.get("method")
    if meta.get("format") != "lightning_qlora" or method not in SERVABLE_METHODS:
        raise AdapterFormatError(
            f"{directory}: method {method!r} cannot be served; serving batches adapters whose update is "
            f"scale * B A ({', '.join(SERVABLE_METHODS)}). Merge other methods into the base instead."
        )
    r, alpha = int(config["r"]), float(config["alpha"])
    scale = alpha / math.sqrt(r) if config.get("rslora") else alpha / r
    tensors = _read_weights(directory / WEIGHTS_FILE)
    modules = {}
    for name in meta["targets"]:
        if f"{name}.lora_A" not in tensors or f"{name}.lora_B" not in tensors:
            raise AdapterFormatError(f"{directory}: weights of target {name!r} are missing.")
        modules[name] = _factors(tensors[f"{name}.lora_A"], tensors[f"{name}.lora_B"], scale, name)
    return LoRAFactors(modules)


def _pattern_value(patterns: dict, name: str, default: float) -> float:
    """PEFT's rule: the first pattern key ``k`` with ``re.match(rf"(.*\\.)?({k})$", name)``."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _read_peft(directory: Path) -> LoRAFactors:
    meta = _read_json(directory / PEFT_CONFIG_FILE)
    if meta.get("peft_type") != "LORA" or meta.get("use_dora"):
        kind = "DoRA" if meta.get("use_dora") else meta.get("peft_type")
        raise AdapterFormatError(f"{directory}: PEFT adapter type {kind!r} cannot be served; only plain LORA can.")
    tensors = _read_weights(directory / PEFT_WEIGHTS_FILE)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        match = re.fullmatch(r"base_model\.model\.(.+)\.(lora_A|lora_B)(?:\.[^.]+)?\.weight", key)
        if match is None:
            raise AdapterFormatError(f"{directory}: tensor {key!r} is not a LoRA factor (embeddings, biases and "
                                     "modules_to_save cannot be served).")  # fmt: skip
        pairs.setdefault(match.group(1), {})[match.group(2)] = value
    modules = {}
    for name, pair in sorted(pairs.items()):
        if set(pair) != {"lora_A", "lora_B"}:
            raise AdapterFormatError(f"{directory}: {name!r} has {sorted(pair)} but needs lora_A and lora_B.")
        r = pair["lora_A"].shape[0]
        alpha = float(_pattern_value(meta.get("alpha_pattern"), name, meta["lora_alpha"]))
        scale = alpha / math.sqrt(r) if meta.get("use_rslora") else alpha / r
        modules[name] = _factors(pair["lora_A"], pair["lora_B"], scale, name)
    return LoRAFactors(modules)


def read_lora_factors(directory: str | Path) -> LoRAFactors:
    """The factors of the adapter in ``directory`` (our format first, then PEFT's)."""
    directory = Path(directory)
    if (directory / CONFIG_FILE).is_file():
        factors = _read_ours(directory)
    elif (directory / PEFT_CONFIG_FILE).is_file():
        factors = _read_peft(directory)
    else:
        raise AdapterFormatError(f"{directory} holds neither {CONFIG_FILE} nor {PEFT_CONFIG_FILE}.")
    if not factors.modules:
        raise AdapterFormatError(f"{directory}: the adapter adapts no layer.")
    return factors
