"""``load_causal_lm``: any transformers causal LM from a local directory or the HF cache, straight into 4 bits.

The model is never a float copy first: a meta-device skeleton is built from ``config.json``,
the safetensors shards are streamed tensor by tensor and each Linear weight is quantized as
it is read (:mod:`lightning_qlora.models.streaming`). Peak memory growth stays under the
final model size plus two of the largest tensor in fp32 plus 256 MB (``tests/models`` pins it).
The layers are :class:`~lightning_qlora.quantization.Linear4bit` holding a
:class:`~lightning_qlora.quantization.Quantized4bitTensor` -- what ``NF4Precision`` makes --
so the plugin only adds adapters to the result.

Everything that can be wrong (path, cache, config, tokenizer, every shard header, the key
map) is checked before the first weight is read, so a bad checkpoint fails in a second with
a typed error and leaves nothing half-loaded.

Example:
    >>> model, tokenizer = load_causal_lm("/models/Qwen2.5-0.5B-Instruct", mode="nf4-dq")
    >>> type(model.model.layers[0].mlp.up_proj).__name__
    'Linear4bit'
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from lightning_qlora.errors import BLOCK_SIZES_4BIT, InvalidBlockSizeError, check_block_size
from lightning_qlora.models.checkpoint import read_checkpoint_layout
from lightning_qlora.models.errors import CheckpointFileError, LoaderConfigError
from lightning_qlora.models.skeleton import build_skeleton, check_causal_lm, plan_keys, read_config
from lightning_qlora.models.source import ModelSource, resolve_model_source
from lightning_qlora.models.streaming import stream_checkpoint
from lightning_qlora.plugins.compute_dtype import choose_compute_dtype
from lightning_qlora.qlora import MODES, QLoRAConfigError
from lightning_qlora.quantization.convert import quantize_linears


def _check_arguments(mode: str, blocksize: int, compute_dtype: str | torch.dtype, skip_modules: Any) -> torch.dtype:
    if mode not in MODES:
        raise LoaderConfigError(f"mode={mode!r} is not a load mode; choose one of {', '.join(MODES)}.")
    try:
        check_block_size(blocksize, BLOCK_SIZES_4BIT)
        dtype = choose_compute_dtype(compute_dtype)  # "auto": what the plugin picks, so the two agree
    except (InvalidBlockSizeError, QLoRAConfigError) as error:
        raise LoaderConfigError(str(error)) from None
    if isinstance(skip_modules, str) or not all(isinstance(s, str) for s in skip_modules):
        raise LoaderConfigError(f"skip_modules={skip_modules!r} must be a list of layer names, e.g. ['lm_head'].")
    return dtype


def _load_tokenizer(source: ModelSource, trust_remote_code: bool) -> Any:
    from transformers import AutoTokenizer

    extra = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    try:
        return AutoTokenizer.from_pretrained(
            source.directory, local_files_only=True, trust_remote_code=trust_remote_code, **extra
        )
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CheckpointFileError(
            f"no usable tokenizer in {source.directory} ({error}). Save the model's tokenizer next to its weights "
            "(tokenizer.save_pretrained(dir) writes tokenizer.json and tokenizer_config.json)."
        ) from None


def _load_generation_config(model: Any, directory: Path) -> None:
    from transformers import GenerationConfig

    if (directory / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(directory, local_files_only=True)


def _load_gguf(
    source: ModelSource,
    quant: tuple[str, bool] | None,
    blocksize: int,
    dtype: torch.dtype,
    skip: Sequence[str],
    trust_remote_code: bool,
) -> Any:
    """GGUF through transformers' own loader, which dequantizes the file to float; then layer-by-layer 4 bits."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(
            source.directory,
            gguf_file=source.gguf_file,
            dtype=dtype,
            local_files_only=True,
            trust_remote_code=trust_remote_code,
        )
    except (OSError, ValueError, KeyError) as error:
        raise CheckpointFileError(
            f"transformers cannot load {source.directory / source.gguf_file} ({error}); it needs the `gguf` package "
            "and a GGUF architecture transformers supports (llama, qwen2, mistral, gemma2/3, phi3...)."
        ) from None
    model.hf_quantizer = None  # the weights are float now; the GGUF marker would block saving
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if quant is not None:
        quantize_linears(model, quant[0], blocksize, quant[1], skip=skip)
    return model


def load_causal_lm(
    path: str | Path,
    *,
    mode: str = "nf4-dq",
    blocksize: int = 64,
    compute_dtype: str | torch.dtype = "auto",
    skip_modules: Sequence[str] = ("lm_head",),
    trust_remote_code: bool = False,
    cache_dir: str | Path | None = None,
    progress: bool | None = None,
) -> tuple[Any, Any]:
    """Load a causal LM and its tokenizer offline, its Linear layers quantized while they are read.

    Args:
        path: a directory in transformers' layout (``config.json``, ``*.safetensors`` shards with
            their index, tokenizer files), a ``.gguf`` file, or a repo id already in the local
            Hugging Face cache (never downloaded).
        mode: ``"nf4-dq"`` (QLoRA), ``"nf4"``, ``"fp4"``, ``"fp4-dq"``, or ``"none"`` (the float model).
        blocksize: elements per absmax block (32..4096).
        compute_dtype: dtype of the weights kept in float (embeddings, norms, biases, ``skip_modules``)
            and the 4-bit weights' dequantized dtype: ``"auto"`` (bf16 on CUDA and on CPUs with
            native bf16, else fp32), ``"fp32"``, ``"bf16"``, ``"fp16"`` or a ``torch.dtype``.
        skip_modules: Linear layers left in float (names or name suffixes).
        trust_remote_code: allow a model whose code ships in the directory.
        cache_dir: the Hugging Face hub cache to resolve repo ids in (default ``$HF_HUB_CACHE``).
        progress: progress bar (``None``: on checkpoints over 1 GiB).

    Returns:
        ``(model, tokenizer)``, the model in eval mode on the CPU.

    Raises:
        LoaderConfigError: a bad ``mode``, ``blocksize``, ``compute_dtype`` or ``skip_modules``.
        ModelPathNotFoundError: ``path`` does not exist and is not a repo id.
        ModelNotInCacheError: a repo id not in the local cache (the message says where it looked).
        CheckpointFileError: no config or tokenizer, a truncated shard, an index naming a missing shard,
            weights that do not match ``config.json``.
        UnsupportedArchitectureError: ``config.json`` is not a causal LM transformers can build.
    """
    dtype = _check_arguments(mode, blocksize, compute_dtype, skip_modules)
    skip = tuple(skip_modules)
    quant = MODES[mode]
    source = resolve_model_source(path, cache_dir)
    tokenizer = _load_tokenizer(source, trust_remote_code)
    if source.gguf_file:
        return _load_gguf(source, quant, blocksize, dtype, skip, trust_remote_code).eval(), tokenizer
    config = read_config(source.directory, trust_remote_code)
    check_causal_lm(config, source.directory / "config.json")
    layout = read_checkpoint_layout(source.directory)
    model = build_skeleton(config, dtype, trust_remote_code)
    plan = plan_keys(model, layout)
    stream_checkpoint(
        model, layout, plan, quant=quant, blocksize=blocksize, compute_dtype=dtype, skip=skip, progress=progress
    )
    _load_generation_config(model, source.directory)
    return model.eval(), tokenizer
