"""Fill a meta skeleton from safetensors shards tensor by tensor, quantizing each Linear weight as it arrives.

Peak memory is the final model plus about one tensor in flight: each shard is memory-mapped
(``safetensors.safe_open``), a Linear weight is quantized straight from the mapped bytes by
the C++ kernels, any other weight is copied into the compute dtype, and the pages read from
the file are given back at once (``madvise``, :mod:`lightning_qlora.quantization.release`) --
otherwise a 5 GB shard would stay resident until the whole shard is done. No model tensor
ever points into a mapping, so releasing the pages can never change a weight.

The quantizer's temporaries (tens of MB, below glibc's mmap threshold) land in the heap between
the 4-bit tensors that stay; freed, they would stay resident as holes (~1 GB over a 7B load), so
the loader hands them back to the system (``malloc_trim``) after each large tensor.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from lightning_qlora.models.checkpoint import CheckpointLayout
from lightning_qlora.models.errors import CheckpointFileError
from lightning_qlora.models.skeleton import KeyPlan
from lightning_qlora.quantization.convert import quantize_linears
from lightning_qlora.quantization.linear import Linear4bit
from lightning_qlora.quantization.release import file_backed_mappings, release_file_backed_pages
from lightning_qlora.quantization.tensor import quantize_4bit

#: Loads of checkpoints bigger than this show a progress bar (``progress=None``).
PROGRESS_MIN_BYTES = 1 << 30


#: After a tensor of at least this many bytes, freed heap memory goes back to the system.
TRIM_MIN_BYTES = 1 << 20


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim`` (None elsewhere, e.g. musl or macOS, where there is nothing to do)."""
    name = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None
    if trim is not None:
        trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def is_skipped(name: str, skip: Sequence[str]) -> bool:
    """The rule of :func:`~lightning_qlora.quantization.convert.quantize_linears`: ``name`` is or ends in ``.<s>``."""
    return any(name == s or name.endswith("." + s) for s in skip)


def _float_dtype(model: nn.Module, name: str, compute_dtype: torch.dtype) -> torch.dtype:
    keep = list(getattr(model, "_keep_in_fp32_modules", None) or []) + list(
        getattr(model, "_keep_in_fp32_modules_strict", None) or []
    )
    # transformers' rule: a module named in _keep_in_fp32_modules keeps fp32 whatever the load dtype
    return torch.float32 if any(k in name.split(".") for k in keep) else compute_dtype


class _Filler:
    """Puts tensors into the skeleton: float copies, or 4-bit layers for the Linear weights to quantize."""

    def __init__(
        self,
        model: nn.Module,
        quant: tuple[str, bool] | None,
        blocksize: int,
        compute_dtype: torch.dtype,
        skip: Sequence[str],
    ) -> None:
        self.model, self.quant, self.blocksize, self.compute_dtype = model, quant, blocksize, compute_dtype
        self.to_quantize = set()
        if quant is not None:
            # the layers quantize_linears (the plugin) would quantize: the same rule, so the same model
            self.to_quantize = {
                n for n, m in model.named_modules() if isinstance(m, nn.Linear) and not is_skipped(n, skip)
            }
        self.early_bias: dict[str, torch.Tensor] = {}  # biases read before their layer's weight
        self.quantized: list[str] = []

    def put(self, name: str, tensor: torch.Tensor) -> None:
        module_name, _, attr = name.rpartition(".")
        module = self.model.get_submodule(module_name) if module_name else self.model
        if module_name in self.to_quantize and attr == "weight":
            self._put_4bit(module_name, module, tensor)
        elif module_name in self.to_quantize and attr == "bias":
            copy = self._float_copy(name, tensor)
            if isinstance(module, Linear4bit):
                module.bias = nn.Parameter(copy)
            else:
                self.early_bias[module_name] = copy
        elif attr in module._parameters:
            old = module._parameters[attr]
            module._parameters[attr] = nn.Parameter(self._float_copy(name, tensor), requires_grad=old.requires_grad)
        else:  # a persistent buffer: keep the dtype the model gave it
            module._buffers[attr] = self._float_copy(name, tensor, dtype=module._buffers[attr].dtype)

    def _float_copy(self, name: str, tensor: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        # always a fresh tensor: nothing may point into the mapping whose pages are released
        if dtype is None:
            dtype = _float_dtype(self.model, name, self.compute_dtype) if tensor.is_floating_point() else tensor.dtype
        return torch.empty(tensor.shape, dtype=dtype).copy_(tensor)

    def _put_4bit(self, module_name: str, linear: nn.Module, tensor: torch.Tensor) -> None:
        quant_type, double_quant = self.quant
        try:
            weight = quantize_4bit(tensor, quant_type, self.blocksize, double_quant=double_quant)
        except ValueError as error:  # NaN/Inf in the file: name the tensor and the file's fix
            raise CheckpointFileError(f"cannot quantize {module_name}.weight: {error}") from None
        layer = Linear4bit(weight.to(self.compute_dtype))  # dtype tag only: the codes stay 4-bit
        if linear.bias is not None:
            bias = self.early_bias.pop(module_name, None)
            # a meta placeholder until the bias arrives; the final check refuses any meta tensor left
            layer.bias = nn.Parameter(bias if bias is not None else torch.empty_like(linear.bias, device="meta"))
        parent_name, _, child = module_name.rpartition(".")
        setattr(self.model.get_submodule(parent_name) if parent_name else self.model, child, layer)
        self.quantized.append(module_name)


def _progress_bar(layout: CheckpointLayout, progress: bool | None) -> Any:
    from tqdm.auto import tqdm

    enabled = layout.nbytes >= PROGRESS_MIN_BYTES if progress is None else progress
    return tqdm(total=layout.nbytes, unit="B", unit_scale=True, disable=not enabled, desc="loading", leave=False)


def stream_checkpoint(
    model: nn.Module,
    layout: CheckpointLayout,
    plan: KeyPlan,
    *,
    quant: tuple[str, bool] | None,
    blocksize: int,
    compute_dtype: torch.dtype,
    skip: Sequence[str],
    progress: bool | None = None,
) -> list[str]:
    """Load ``layout`` into the meta skeleton ``model`` following ``plan``, in place.

    Args:
        quant: ``(quant_type, double_quant)`` for the Linear weights, or ``None`` for a float model.
        blocksize: 4-bit block size.
        compute_dtype: dtype of every other floating weight.
        skip: Linear layers kept in float (names or name suffixes, e.g. ``lm_head``).
        progress: show a progress bar (``None``: for checkpoints over 1 GiB).

    Returns:
        The names of the quantized Linear layers.
    """
    from safetensors import SafetensorError, safe_open

    filler = _Filler(model, quant, blocksize, compute_dtype, skip)
    bar = _progress_bar(layout, progress)
    try:
        for shard in layout.shards:
            bar.set_description(shard.path.name)
            wanted = [info for info in shard.tensors if info.key in plan.targets]
            with safe_open(str(shard.path), framework="pt") as handle:
                mappings = file_backed_mappings()  # now that the shard is mapped
                for info in wanted:
                    try:
                        tensor = handle.get_tensor(info.key)
                    except SafetensorError as error:
                        raise CheckpointFileError(f"cannot read {info.key!r} from {shard.path}: {error}") from None
                    filler.put(plan.targets[info.key], tensor)
                    release_file_backed_pages(tensor, (), mappings)
                    del tensor
                    if info.nbytes >= TRIM_MIN_BYTES and _malloc_trim() is not None:
                        _malloc_trim()(0)
                    bar.update(info.nbytes)
    finally:
        bar.close()
    model.tie_weights()
    if quant is not None:  # a tied output layer that is not skipped: quantized from its (now real) source
        filler.quantized += quantize_linears(model, quant[0], blocksize, quant[1], skip=skip)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    if left:
        raise CheckpointFileError(f"the checkpoint in {layout.directory} left {', '.join(left[:5])} unloaded.")
    return filler.quantized
