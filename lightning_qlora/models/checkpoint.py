"""The safetensors shards of a model directory, validated before a single weight is read.

:func:`read_checkpoint_layout` finds the shards (through ``model.safetensors.index.json`` when
there is one), opens every header (``safetensors.safe_open`` checks that the file covers what its
header promises, which catches truncated downloads) and checks the index against the shards. Any
problem is a :class:`~lightning_qlora.models.errors.CheckpointFileError` naming the file and the
fix, raised before the model exists -- so a bad checkpoint never leaves a half-loaded model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from lightning_qlora.models.errors import CheckpointFileError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# safetensors files a model directory may hold that are not base-model weights
_NOT_WEIGHTS = ("adapter_model.safetensors",)
_ITEMSIZE = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "U16": 2,
    "U32": 4,
    "U64": 8,
}


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a shard: its key, safetensors dtype name, shape and size in bytes."""

    key: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count

    @property
    def nbytes(self) -> int:
        return self.numel * _ITEMSIZE.get(self.dtype, 4)


@dataclass(frozen=True)
class Shard:
    """A safetensors file and its tensors (in the file's own order)."""

    path: Path
    tensors: tuple[TensorInfo, ...]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


@dataclass(frozen=True)
class CheckpointLayout:
    """Every shard of a checkpoint, in the order to stream them."""

    directory: Path
    shards: tuple[Shard, ...]
    tensors: dict[str, TensorInfo] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.shards)

    def largest_tensor_numel(self) -> int:
        return max((t.numel for t in self.tensors.values()), default=0)


def _read_header(path: Path) -> tuple[TensorInfo, ...]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            infos = []
            for key in handle.keys():
                tensor_slice = handle.get_slice(key)
                infos.append(TensorInfo(key, tensor_slice.get_dtype(), tuple(tensor_slice.get_shape())))
    except (SafetensorError, OSError) as error:
        size = path.stat().st_size if path.exists() else 0
        raise CheckpointFileError(
            f"checkpoint shard {path} ({size:,} bytes) is not a readable safetensors file: {error}. It is probably "
            "truncated (an interrupted download or copy); download or save it again (save_pretrained writes it)."
        ) from None
    return tuple(infos)


def _shard_files(directory: Path) -> tuple[list[Path], dict[str, str] | None]:
    index = directory / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as error:
            raise CheckpointFileError(
                f"{index} is not a safetensors index (a JSON object with a 'weight_map'): {error}; download or save "
                "the checkpoint again."
            ) from None
        names = sorted(set(weight_map.values()))
        missing = [name for name in names if not (directory / name).is_file()]
        if missing:
            raise CheckpointFileError(
                f"{index} names shard(s) that are not in {directory}: {', '.join(missing)}. The download or copy is "
                "incomplete; fetch the missing shard(s) or save the checkpoint again."
            )
        return [directory / name for name in names], weight_map
    if (directory / SINGLE_FILE).is_file():
        return [directory / SINGLE_FILE], None
    files = sorted(p for p in directory.glob("*.safetensors") if p.name not in _NOT_WEIGHTS)
    if files:
        return files, None
    pickled = sorted(p.name for p in directory.glob("*.bin")) + sorted(p.name for p in directory.glob("*.pt*"))
    hint = ""
    if pickled:
        hint = (
            f" It holds {', '.join(pickled)}: pickled weights are never loaded (unpickling runs code); convert "
            "them once with `AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir)`."
        )
    raise CheckpointFileError(f"{directory} has no *.safetensors weights (nor {INDEX_FILE}).{hint}")


def read_checkpoint_layout(directory: str | Path) -> CheckpointLayout:
    """Find and validate every shard of the checkpoint in ``directory``.

    Raises:
        CheckpointFileError: no weights, an index naming a missing shard, a truncated or
            unreadable shard, or an index that disagrees with the shards' contents.
    """
    directory = Path(directory)
    files, weight_map = _shard_files(directory)
    shards = tuple(Shard(path, _read_header(path)) for path in files)
    tensors: dict[str, TensorInfo] = {}
    owner: dict[str, Path] = {}
    for shard in shards:
        for info in shard.tensors:
            if info.key in tensors:
                raise CheckpointFileError(
                    f"tensor {info.key!r} is in both {owner[info.key].name} and {shard.path.name} (in {directory}); "
                    "the checkpoint mixes two saves -- remove the stale shard or save it again."
                )
            tensors[info.key], owner[info.key] = info, shard.path
    if weight_map is not None:
        for key, name in weight_map.items():
            if owner.get(key) is None or owner[key].name != name:
                found = f"it is in {owner[key].name}" if key in owner else "no shard holds it"
                raise CheckpointFileError(
                    f"{directory / INDEX_FILE} puts {key!r} in {name}, but {found}; the index and the shards come "
                    "from different saves -- download or save the checkpoint again."
                )
    return CheckpointLayout(directory, shards, tensors)
