"""Where a model lives: a local directory, a GGUF file, or a repo id already in the local HF cache.

We never download: a repo id resolves only to a snapshot already in the Hugging Face cache
(``$HF_HUB_CACHE``, by default ``~/.cache/huggingface/hub``), and a miss is a typed error that
names where we looked and how to put the model there.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from lightning_qlora.models.errors import ModelNotInCacheError, ModelPathNotFoundError

# ``org/name`` (one slash, hub-legal characters, not a relative path such as ./x or ../x)
_REPO_ID = re.compile(r"^(?!\.{1,2}/)[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class ModelSource:
    """A resolved model location.

    Attributes:
        directory: the transformers-layout directory (``config.json``, shards, tokenizer files).
        gguf_file: the GGUF file inside ``directory`` when the model is one GGUF file, else ``None``.
        repo_id: the repo id it was resolved from, if any.
    """

    directory: Path
    gguf_file: str | None = None
    repo_id: str | None = None


def _default_cache_dir() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def _from_cache(repo_id: str, cache_dir: Path) -> ModelSource:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, "config.json", cache_dir=str(cache_dir))
    if not isinstance(found, str):
        raise ModelNotInCacheError(
            f"{repo_id!r} is not a local directory and the Hugging Face cache has no snapshot of it with a config.json "
            f"(looked in {cache_dir / ('models--' + repo_id.replace('/', '--'))}). lightning_qlora never downloads: "
            f"fetch it on a machine with network access (`hf download {repo_id}`, into the same cache or "
            f"`--local-dir <dir>`), or pass model.path=<a local directory with config.json and *.safetensors>."
        )
    return ModelSource(Path(found).parent, repo_id=repo_id)


def resolve_model_source(path: str | Path, cache_dir: str | Path | None = None) -> ModelSource:
    """Resolve ``path`` to a :class:`ModelSource` without touching the network.

    Args:
        path: a directory in transformers' layout, a ``.gguf`` file, or a repo id (``org/name``)
            that is already in the local Hugging Face cache.
        cache_dir: the hub cache to search (default ``huggingface_hub.constants.HF_HUB_CACHE``).

    Raises:
        ModelPathNotFoundError: ``path`` does not exist and is not a repo id.
        ModelNotInCacheError: a repo id that the cache does not hold.
    """
    text = str(path)
    local = Path(text).expanduser()
    if local.is_dir():
        return ModelSource(local.resolve())
    if local.is_file():
        if local.suffix.lower() == ".gguf":
            return ModelSource(local.resolve().parent, gguf_file=local.name)
        raise ModelPathNotFoundError(
            f"{local} is a file, not a model directory; pass the directory that holds config.json and the "
            "*.safetensors shards (or a .gguf file)."
        )
    if isinstance(path, str) and _REPO_ID.match(text):
        return _from_cache(text, Path(cache_dir) if cache_dir is not None else _default_cache_dir())
    raise ModelPathNotFoundError(
        f"model path {text!r} does not exist. Pass a directory with config.json and *.safetensors "
        "(written by save_pretrained), a .gguf file, or a repo id (org/name) already in the Hugging Face cache."
    )
