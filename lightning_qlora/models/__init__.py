"""Real pretrained models that ship inside PyPI packages (no hub downloads)."""

from lightning_qlora.models.smollm2 import ModelNotAvailableError, load_smollm2, smollm2_gguf_path

__all__ = ["ModelNotAvailableError", "load_smollm2", "smollm2_gguf_path"]
