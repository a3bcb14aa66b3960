"""A readable summary of a model's adapters: method, shapes, ranks, trainable parameters, and
the memory the 4-bit base weights save."""

from __future__ import annotations

from torch import nn

from lightning_qlora.adapters.inject import adapter_layers
from lightning_qlora.quantization.memory import weight_memory
from lightning_qlora.quantization.tensor import Quantized4bitTensor


def trainable_parameter_count(model: nn.Module) -> int:
    """Number of elements the optimizer will update (parameters shared by layers count once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def quantized_weight_bytes(model: nn.Module) -> tuple[int, int, int]:
    """``(elements, float bytes, stored bytes)`` over every 4-bit weight in ``model``."""
    numel = floats = stored = 0
    for parameter in model.parameters():
        if isinstance(parameter, Quantized4bitTensor):
            memory = weight_memory(parameter)
            numel += memory.numel
            floats += memory.float_bytes
            stored += memory.quantized_bytes
    return numel, floats, stored


def _rank(layer: nn.Module) -> str:
    rank = getattr(layer, "rank", None)
    if rank is None:
        rank = getattr(layer.config, "r", None)
    return "-" if rank is None else str(rank)


def adapter_summary(model: nn.Module, max_rows: int | None = None) -> str:
    """One line per adapter (at most ``max_rows``), then parameter and quantization totals."""
    layers = adapter_layers(model)
    lines = [f"{'layer':<48} {'method':<10} {'in':>6} {'out':>6} {'rank':>5} {'trainable':>10}"]
    for index, (name, layer) in enumerate(layers.items()):
        if max_rows is not None and index == max_rows:
            lines.append(f"... {len(layers) - max_rows} more adapter layers")
            break
        count = sum(p.numel() for p in layer.trainable_parameters())
        lines.append(
            f"{name:<48} {layer.config.method:<10} {layer.in_features:>6} {layer.out_features:>6} "
            f"{_rank(layer):>5} {count:>10,}"
        )
    trainable = trainable_parameter_count(model)
    total = sum(p.numel() for p in model.parameters())
    lines.append(f"trainable {trainable:,} of {total:,} parameters ({100 * trainable / max(total, 1):.3f}%)")
    numel, floats, stored = quantized_weight_bytes(model)
    if numel:
        lines.append(
            f"4-bit base weights: {stored / 2**20:,.1f} MiB instead of {floats / 2**20:,.1f} MiB "
            f"(saves {(floats - stored) / 2**20:,.1f} MiB; {8 * stored / numel:.3f} bits per parameter)"
        )
    return "\n".join(lines)
