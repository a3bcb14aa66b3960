"""lightning_qlora: QLoRA fine-tuning for PyTorch Lightning.

NF4/FP4 quantization bit-exact with bitsandbytes, custom ops with C++/CUDA kernels, and
(as they land) adapters, a Lightning precision plugin, callbacks, paged optimizers and a
Hydra app.
"""

from lightning_qlora import _openmp  # noqa: F401, I001  (first: OpenMP reads its wait policy when torch loads)
from lightning_qlora import _registration, ops  # noqa: F401  (ops registers the custom ops)

_registration.install()  # Trainer(strategy="paged" | "paged_ddp" | "qlora_fsdp"), without importing Lightning

__version__ = "0.1.0"
