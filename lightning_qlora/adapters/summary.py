"""A readable summary of a model's adapters: method, shapes and trainable parameters."""

from __future__ import annotations

from torch import nn

from lightning_qlora.adapters.inject import adapter_layers


def trainable_parameter_count(model: nn.Module) -> int:
    """Number of elements the optimizer will update."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def adapter_summary(model: nn.Module) -> str:
    """One line per adapter plus totals (trainable vs all parameters)."""
    lines = [f"{'layer':<48} {'method':<10} {'in':>6} {'out':>6} {'trainable':>10}"]
    for name, layer in adapter_layers(model).items():
        count = sum(p.numel() for p in layer.trainable_parameters())
        lines.append(f"{name:<48} {layer.config.method:<10} {layer.in_features:>6} {layer.out_features:>6} {count:>10,}")
    trainable = trainable_parameter_count(model)
    total = sum(p.numel() for p in model.parameters())
    lines.append(f"trainable {trainable:,} of {total:,} parameters ({100 * trainable / max(total, 1):.3f}%)")
    return "\n".join(lines)
