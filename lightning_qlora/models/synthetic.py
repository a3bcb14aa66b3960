"""Write a random checkpoint of any transformers config, tensor by tensor, as ``save_pretrained`` lays it out.

For tests and benchmarks of big models: a Llama-2-7B checkpoint (13.5 GB in bf16) is written
with about one tensor in memory -- shards are streamed in the safetensors format (8-byte
header length, JSON header, raw little-endian data) instead of building each shard's dict.
Weights are N(0, 0.02^2) (norm scales 1), what transformers' own initialization gives.

Example:
    >>> write_synthetic_checkpoint(transformers.LlamaConfig(...), "/tmp/llama", shard_bytes=4 << 30)
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from lightning_qlora.models.checkpoint import INDEX_FILE
from lightning_qlora.models.skeleton import build_skeleton, tied_parameters

_DTYPE_NAMES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


def _write_shard(
    path: Path, tensors: list[tuple[str, tuple[int, ...]]], dtype: torch.dtype, generator: torch.Generator
) -> None:
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    itemsize = torch.empty((), dtype=dtype).element_size()
    for name, shape in tensors:
        size = itemsize * int(torch.Size(shape).numel())
        header[name] = {"dtype": _DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "wb") as handle:
        handle.write(len(encoded).to_bytes(8, "little"))
        handle.write(encoded)
        for name, shape in tensors:
            if name.endswith("norm.weight") or "layernorm" in name or name.endswith("norm.bias"):
                tensor = torch.ones(shape, dtype=dtype)
            else:
                tensor = (torch.randn(shape, generator=generator) * 0.02).to(dtype)
            handle.write(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
            del tensor
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def write_synthetic_checkpoint(
    config: Any, directory: str | Path, shard_bytes: int = 4 << 30, dtype: torch.dtype = torch.bfloat16, seed: int = 0
) -> Path:
    """Write ``config.json``, random safetensors shards of at most ``shard_bytes`` and their index.

    Args:
        config: a transformers ``PretrainedConfig`` of a causal LM.
        directory: created if needed.
        shard_bytes: shard size limit (a tensor larger than it gets a shard of its own).
        dtype: weight dtype on disk.
        seed: random seed of the weights.

    Returns:
        ``directory``.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    skeleton = build_skeleton(config, dtype)
    tied = tied_parameters(skeleton)
    entries = [(name, tuple(p.shape)) for name, p in skeleton.named_parameters() if name not in tied]
    itemsize = torch.empty((), dtype=dtype).element_size()
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    used = 0
    for name, shape in entries:
        size = itemsize * int(torch.Size(shape).numel())
        if shards[-1] and used + size > shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append((name, shape))
        used += size
    generator = torch.Generator().manual_seed(seed)
    weight_map = {}
    total = 0
    for number, tensors in enumerate(shards, start=1):
        filename = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        _write_shard(directory / filename, tensors, dtype, generator)
        weight_map.update({name: filename for name, _ in tensors})
        total += sum(itemsize * int(torch.Size(shape).numel()) for _, shape in tensors)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    temporary = directory / f".{INDEX_FILE}.tmp"
    with open(temporary, "w") as handle:  # atomic: readers never see an index without its shards
        handle.write(json.dumps(index, indent=2))
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, directory / INDEX_FILE)
    config.save_pretrained(directory)
    return directory
