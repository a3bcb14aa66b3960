"""Multi-adapter serving over one 4-bit base (S-LoRA style).

One quantized base model, many LoRA adapters of different ranks in one batch, adapter weights
and KV cache sharing one paged pool, adapters loaded and evicted on demand:

* :class:`PagePool` -- fixed-size pages allocated once, for KV cache and adapter weights;
* :class:`AdapterRegistry` -- loads adapters (ours or PEFT's) into the pool, LRU eviction, pinning;
* ``lightning_qlora::bgmv`` -- per-row adapter products in one kernel call (C++; CUDA compile-checked);
* :class:`GenerationEngine` -- continuous batching (Llama, Mistral, Qwen2 bases), greedy / temperature + top-p, stop sequences, streaming;
* :mod:`lightning_qlora.serving.api` -- a LitServe OpenAI-compatible endpoint; :mod:`.cli` starts it.
"""

from lightning_qlora.serving.adapter_files import LoRAFactors, read_lora_factors
from lightning_qlora.serving.engine import BASE_MODEL, GenerationEngine
from lightning_qlora.serving.errors import (
    AdapterFormatError,
    InvalidRequestError,
    PoolExhaustedError,
    RequestTooLargeError,
    ServerConfigError,
    ServingError,
    UnknownAdapterError,
    UnsupportedModelError,
)
from lightning_qlora.serving.handles import GenerationEvent, RequestHandle
from lightning_qlora.serving.paged_llama import SUPPORTED_MODEL_TYPES, PagedLlama
from lightning_qlora.serving.pool import PagePool, PoolStats
from lightning_qlora.serving.registry import AdapterRegistry
from lightning_qlora.serving.sampling import SamplingParams

__all__ = [
    "BASE_MODEL",
    "AdapterFormatError",
    "AdapterRegistry",
    "GenerationEngine",
    "GenerationEvent",
    "InvalidRequestError",
    "LoRAFactors",
    "PagePool",
    "PagedLlama",
    "PoolExhaustedError",
    "PoolStats",
    "RequestHandle",
    "RequestTooLargeError",
    "SUPPORTED_MODEL_TYPES",
    "SamplingParams",
    "ServerConfigError",
    "ServingError",
    "UnknownAdapterError",
    "UnsupportedModelError",
    "read_lora_factors",
]
