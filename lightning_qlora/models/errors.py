"""Typed errors of model loading: each names the file (or repo id) at fault and how to fix it."""

from __future__ import annotations

from lightning_qlora.errors import ConfigError, FileFormatError


class ModelPathNotFoundError(FileFormatError, FileNotFoundError):
    """``path`` is neither an existing directory, a GGUF file, nor a repo id."""


class ModelNotInCacheError(FileFormatError, FileNotFoundError):
    """A repo id was given but the local Hugging Face cache does not hold it (we never download)."""


class CheckpointFileError(FileFormatError):
    """A checkpoint file is missing, truncated or inconsistent with its index or the model."""


class UnsupportedArchitectureError(ConfigError):
    """``config.json`` describes a model that is not a causal LM the streaming loader can fill."""


class LoaderConfigError(ConfigError):
    """An argument of :func:`~lightning_qlora.models.load_causal_lm` is invalid."""
