"""Turn an adapter directory -- ours or PEFT's -- into plain LoRA factors for serving, validated.

Our format (``adapter.json`` + ``adapter.safetensors``, see :mod:`lightning_qlora.adapters.io`)
is served for the methods whose update is ``scale * B A`` at inference, as each method's config
says through ``lora_factors_from_state`` (LoRA, LoRA+, LoRA-FA, LoRA-drop, AdaLoRA; the others refuse).
PEFT's layout (``adapter_config.json`` + ``adapter_model.safetensors``) is served for plain
``LORA`` adapters, including per-module ``rank_pattern`` / ``alpha_pattern`` and rsLoRA.
Anything else (DoRA, VeRA, AdaLoRA, ...) raises :class:`AdapterFormatError` saying so.

The files are read by the package's one reader, :func:`lightning_qlora.adapters.io.read_adapter_files`
(missing files, bad JSON, truncated safetensors, missing required fields); this module adds what
serving needs. Nothing in the config is trusted that the tensors can contradict: every module's rank is read
from its tensors, ``lora_A`` and ``lora_B`` must agree on it, and the rank the config declares
(``r``, or PEFT's ``rank_pattern``) must be that rank -- the scale ``alpha / r`` depends on it, so
a mismatch would silently serve wrong text. Factors must be finite. Checking them against the
base model's shapes and the modules serving adapts is :func:`check_fits`.

Example:
    >>> factors = read_lora_factors("adapters/support-bot")
    >>> factors.modules["model.layers.0.self_attn.q_proj"].rank
    16
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lightning_qlora.adapters.base import AdapterConfigError, CapabilityError
from lightning_qlora.adapters.base import LoRAFactors as AdapterLoRAFactors
from lightning_qlora.adapters.io import CONFIG_FILE, PEFT_CONFIG_FILE, WEIGHTS_FILE, AdapterFiles, read_adapter_files
from lightning_qlora.adapters.registry import config_from_dict
from lightning_qlora.serving.errors import AdapterFormatError

__all__ = [
    "AdapterFormatError",
    "LoRAFactors",
    "LoRAModuleFactors",
    "check_fits",
    "is_adapter_dir",
    "read_lora_factors",
]


#: One adapted layer, ``delta(x) = scale * x @ A^T @ B^T`` (the adapters' own factor type).
LoRAModuleFactors = AdapterLoRAFactors


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


def _read_files(directory: Path) -> AdapterFiles:
    """The adapter's files through the package's one validated reader, its errors as :class:`AdapterFormatError`."""
    try:
        return read_adapter_files(directory)
    except AdapterConfigError as error:  # AdapterFileError (missing, damaged, incomplete) or an unknown method
        raise AdapterFormatError(str(error)) from error


def _positive(value: Any, key: str, kind: type | tuple[type, ...], where: Path) -> Any:
    if isinstance(value, bool) or not isinstance(value, kind) or value <= 0:
        raise AdapterFormatError(
            f"{where}: {key}={value!r} must be a positive "
            f"{'integer' if kind is int else 'number'}; fix the config or re-save the adapter."
        )
    return value


def _factors(
    lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float, name: str, declared_rank: int, where: str
) -> LoRAModuleFactors:
    if lora_A.dim() != 2 or lora_B.dim() != 2 or lora_A.shape[0] != lora_B.shape[1]:
        raise AdapterFormatError(
            f"{where}: {name} has lora_A {tuple(lora_A.shape)} and lora_B "
            f"{tuple(lora_B.shape)}, which are not (r, in) and (out, r) of one rank r."
        )
    if lora_A.shape[0] != declared_rank:
        raise AdapterFormatError(
            f"{where}: the config declares rank {declared_rank} for {name} but its tensors have "
            f"rank {lora_A.shape[0]}; the scale alpha/r would be wrong. Fix r (or rank_pattern) "
            "in the config or re-save the adapter."
        )
    lora_A, lora_B = lora_A.float().contiguous(), lora_B.float().contiguous()
    if not (torch.isfinite(lora_A).all() and torch.isfinite(lora_B).all()):
        raise AdapterFormatError(f"{where}: {name} has non-finite (NaN or inf) factors.")
    return LoRAModuleFactors(lora_A, lora_B, float(scale))


def _from_ours(directory: Path, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> LoRAFactors:
    try:
        config = config_from_dict(meta["config"])  # validates r, alpha, ... as training does
    except (AdapterConfigError, ValueError) as error:
        raise AdapterFormatError(f"{directory / CONFIG_FILE}: {error}") from error
    r = _positive(config.r, "r", int, directory / CONFIG_FILE)
    if not all(isinstance(t, str) for t in meta["targets"]):
        raise AdapterFormatError(f"{directory / CONFIG_FILE}: 'targets' must be module names, got {meta['targets']!r}.")
    modules = {}
    for name in meta["targets"]:
        try:  # asked of the method: is its update scale * B A, and what are B, A and the scale from its tensors?
            factors = config.lora_factors_from_state(name, tensors)
        except CapabilityError as error:
            raise AdapterFormatError(f"{directory}: {error}") from error
        except AdapterConfigError as error:
            raise AdapterFormatError(f"{directory}: target {name!r}: {error}") from error
        modules[name] = _factors(factors.lora_A, factors.lora_B, factors.scale, name, r, str(directory))
    return LoRAFactors(modules)


def _pattern_value(patterns: Any, name: str, default: float) -> float:
    """PEFT's rule: the first pattern key ``k`` with ``re.match(rf"(.*\\.)?({k})$", name)``."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _from_peft(directory: Path, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> LoRAFactors:
    where = directory / PEFT_CONFIG_FILE
    if meta.get("peft_type") != "LORA" or meta.get("use_dora"):
        kind = "DoRA" if meta.get("use_dora") else meta.get("peft_type")
        raise AdapterFormatError(f"{directory}: PEFT adapter type {kind!r} cannot be served; only plain LORA can.")
    r, lora_alpha = (
        _positive(meta["r"], "r", int, where),
        _positive(meta["lora_alpha"], "lora_alpha", (int, float), where),
    )
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        match = re.fullmatch(r"base_model\.model\.(.+)\.(lora_A|lora_B)(?:\.[^.]+)?\.weight", key)
        if match is None:
            raise AdapterFormatError(
                f"{directory}: tensor {key!r} is not a LoRA factor (embeddings, biases and "
                "modules_to_save cannot be served)."
            )
        pairs.setdefault(match.group(1), {})[match.group(2)] = value
    modules = {}
    for name, pair in sorted(pairs.items()):
        if set(pair) != {"lora_A", "lora_B"}:
            raise AdapterFormatError(f"{directory}: {name!r} has {sorted(pair)} but needs lora_A and lora_B.")
        rank = int(_pattern_value(meta.get("rank_pattern"), name, r))
        alpha = float(_pattern_value(meta.get("alpha_pattern"), name, lora_alpha))
        scale = alpha / math.sqrt(rank) if meta.get("use_rslora") else alpha / rank
        modules[name] = _factors(pair["lora_A"], pair["lora_B"], scale, name, rank, str(directory))
    return LoRAFactors(modules)


def read_lora_factors(directory: str | Path) -> LoRAFactors:
    """The validated factors of the adapter in ``directory`` (our format first, then PEFT's).

    Raises:
        AdapterFormatError: missing/unreadable/truncated files, missing config fields, an unservable
            method, factors whose ranks disagree with each other or with the config, non-finite values.
    """
    directory = Path(directory)
    files = _read_files(directory)
    factors = (_from_ours if files.format == "lightning_qlora" else _from_peft)(directory, files.meta, files.tensors)
    if not factors.modules:
        raise AdapterFormatError(f"{directory}: the adapter adapts no layer.")
    return factors


def check_fits(name: str, factors: LoRAFactors, module_shapes: dict[str, tuple[int, int]], page_size: int) -> None:
    """Raise :class:`AdapterFormatError` unless every factor matches a module serving adapts, in shape.

    Args:
        name: the adapter's served name (for the message).
        factors: what :func:`read_lora_factors` returned.
        module_shapes: ``(in_features, out_features)`` of every module serving adapts, by qualified name.
        page_size: floats per pool page (a factor row must fit in one page).
    """
    for module, f in factors.modules.items():
        if module not in module_shapes:
            example = next(iter(module_shapes))
            raise AdapterFormatError(
                f"adapter {name!r} adapts {module!r}, which serving does not adapt in this base model; it serves the "
                f"attention and MLP projections of each decoder layer (e.g. {example!r}). Re-train without it "
                "(e.g. keep lm_head and embeddings in skip_modules)."
            )
        expected = module_shapes[module]
        if (f.lora_A.shape[1], f.lora_B.shape[0]) != expected:
            raise AdapterFormatError(
                f"adapter {name!r}: {module} has (in, out) = ({f.lora_A.shape[1]}, {f.lora_B.shape[0]}) but the "
                f"base layer has {expected}; was it trained on another model?"
            )
        if max(expected) > page_size:
            raise AdapterFormatError(
                f"adapter {name!r}: pool pages of {page_size} floats cannot hold a factor row "
                f"of {max(expected)}; start the server with page_size >= {max(expected)}."
            )
