"""Quantization report: bits/param, bytes saved and reconstruction error of every Linear.

Usage::

    python -m lightning_qlora.quantization.report                  # SmolLM2-135M-Instruct
    python -m lightning_qlora.quantization.report --model random   # one 4096x4096 weight
    python -m lightning_qlora.quantization.report --blocksize 128 --csv report.csv --no-per-layer

For NF4, FP4 and INT4, each with and without double quantization (DQ), every ``nn.Linear``
weight is quantized once, dequantized, and compared with the float weight. Two bits/param
figures are printed: ``codes+scales`` (4-bit codes and absmax constants, the 4.127 of QLoRA's
NF4+DQ at block 64/256) and ``stored`` (also the codebook tables each layer's state dict
carries, 16 floats and with DQ another 256).
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from torch import nn

from lightning_qlora.errors import BLOCK_SIZES_4BIT
from lightning_qlora.quantization.memory import weight_memory
from lightning_qlora.quantization.tensor import quantize_4bit

#: (label, quant_type, double_quant) of every configuration the report compares.
CONFIGS: tuple[tuple[str, str, bool], ...] = (
    ("NF4+DQ", "nf4", True),
    ("NF4", "nf4", False),
    ("FP4+DQ", "fp4", True),
    ("FP4", "fp4", False),
    ("INT4+DQ", "int4", True),
    ("INT4", "int4", False),
)
MODELS: tuple[str, ...] = ("smollm2", "random", "tiny")


@dataclass(frozen=True)
class LayerStats:
    """One weight under one configuration."""

    layer: str
    config: str
    rows: int
    cols: int
    numel: int
    float_bytes: int
    stored_bytes: int
    codebook_bytes: int
    squared_error: float  # sum over elements, float64
    max_abs_error: float

    @property
    def mse(self) -> float:
        return self.squared_error / self.numel

    @property
    def bits_per_param(self) -> float:
        """All stored bits, codebooks included."""
        return self.stored_bytes * 8 / self.numel

    @property
    def payload_bits_per_param(self) -> float:
        """Codes and scales only."""
        return (self.stored_bytes - self.codebook_bytes) * 8 / self.numel

    @property
    def saved_bytes(self) -> int:
        return self.float_bytes - self.stored_bytes


def quantize_layer_stats(
    name: str, weight: torch.Tensor, config: str, quant_type: str, blocksize: int, double_quant: bool
) -> LayerStats:
    """Quantize ``weight`` once and measure storage and reconstruction error against it."""
    quantized = quantize_4bit(weight, quant_type, blocksize, double_quant=double_quant)
    error = quantized.dequantize(torch.float32) - weight.float()
    memory = weight_memory(quantized)
    rows, cols = (weight.shape[0], weight[0].numel()) if weight.dim() > 1 else (1, weight.numel())
    return LayerStats(
        layer=name,
        config=config,
        rows=rows,
        cols=cols,
        numel=weight.numel(),
        float_bytes=memory.float_bytes,
        stored_bytes=memory.quantized_bytes,
        codebook_bytes=memory.codebook_bytes,
        squared_error=float(error.double().square().sum()),
        max_abs_error=float(error.abs().max()),
    )


def linear_weights(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """``(name, weight)`` of every ``nn.Linear`` in ``model``."""
    return [(name, module.weight.detach()) for name, module in model.named_modules() if isinstance(module, nn.Linear)]


def report_model(model: nn.Module, blocksize: int = 64, progress: bool = True) -> list[LayerStats]:
    """Stats of every Linear weight of ``model`` under every configuration in :data:`CONFIGS`."""
    from rich.progress import Progress

    weights = linear_weights(model)
    stats: list[LayerStats] = []
    with Progress(transient=True, disable=not progress) as bar:
        task = bar.add_task("quantizing Linear layers", total=len(weights))
        for name, weight in weights:
            for label, quant_type, double_quant in CONFIGS:
                stats.append(quantize_layer_stats(name, weight, label, quant_type, blocksize, double_quant))
            bar.advance(task)
    return stats


def totals(stats: Iterable[LayerStats]) -> dict[str, LayerStats]:
    """Per configuration, the sums over layers (MSE weighted by elements, max of max errors)."""
    merged: dict[str, LayerStats] = {}
    for row in stats:
        seen = merged.get(row.config)
        if seen is None:
            merged[row.config] = LayerStats(**{**asdict(row), "layer": "TOTAL", "rows": 0, "cols": 0})
            continue
        merged[row.config] = LayerStats(
            layer="TOTAL",
            config=row.config,
            rows=0,
            cols=0,
            numel=seen.numel + row.numel,
            float_bytes=seen.float_bytes + row.float_bytes,
            stored_bytes=seen.stored_bytes + row.stored_bytes,
            codebook_bytes=seen.codebook_bytes + row.codebook_bytes,
            squared_error=seen.squared_error + row.squared_error,
            max_abs_error=max(seen.max_abs_error, row.max_abs_error),
        )
    return merged


def _build_model(name: str) -> nn.Module:
    if name == "smollm2":
        from lightning_qlora.models import load_smollm2

        return load_smollm2()[0]
    generator = torch.Generator().manual_seed(0)
    if name == "random":
        layer = nn.Linear(4096, 4096, bias=False)
        with torch.no_grad():
            layer.weight.copy_(torch.randn(4096, 4096, generator=generator) * 0.02)
        return nn.Sequential(layer)
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(96, 192), nn.ReLU(), nn.Linear(192, 96), nn.Linear(96, 10))


def render(stats: Sequence[LayerStats], per_layer: bool, title: str) -> None:
    """Print the per-layer table (optional), the totals table and the NF4+DQ summary line."""
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 150)  # logs and pipes get full-width tables
    if per_layer:
        table = Table(title=f"{title}: per layer", show_lines=False)
        for column in ("layer", "shape", "config", "bits/param", "MSE", "max |err|"):
            table.add_column(column, justify="left" if column in ("layer", "config") else "right")
        for row in stats:
            table.add_row(
                row.layer,
                f"{row.rows}x{row.cols}",
                row.config,
                f"{row.bits_per_param:.3f}",
                f"{row.mse:.3e}",
                f"{row.max_abs_error:.4f}",
            )
        console.print(table)
    summary = totals(stats)
    table = Table(title=f"{title}: totals over {len({r.layer for r in stats})} Linear weights")
    for column in (
        "config",
        "params",
        "bits/param (codes+scales)",
        "bits/param (stored)",
        "float MB",
        "stored MB",
        "saved MB",
        "MSE",
        "max |err|",
    ):
        table.add_column(column, justify="left" if column == "config" else "right")
    for row in summary.values():
        table.add_row(
            row.config,
            f"{row.numel:,}",
            f"{row.payload_bits_per_param:.3f}",
            f"{row.bits_per_param:.3f}",
            f"{row.float_bytes / 1e6:.1f}",
            f"{row.stored_bytes / 1e6:.1f}",
            f"{row.saved_bytes / 1e6:.1f}",
            f"{row.mse:.3e}",
            f"{row.max_abs_error:.4f}",
        )
    console.print(table)
    nf4_dq = summary["NF4+DQ"]
    console.print(
        f"NF4+DQ total: {nf4_dq.payload_bits_per_param:.3f} bits/param (codes+scales), "
        f"{nf4_dq.bits_per_param:.3f} stored; {nf4_dq.saved_bytes / 1e6:.1f} MB saved of "
        f"{nf4_dq.float_bytes / 1e6:.1f} MB; MSE {nf4_dq.mse:.3e}"
    )


def write_csv(stats: Sequence[LayerStats], path: Path) -> None:
    """One row per layer x configuration, with the derived columns."""
    names = [f.name for f in fields(LayerStats)] + ["mse", "bits_per_param", "payload_bits_per_param", "saved_bytes"]
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=names)
        writer.writeheader()
        for row in stats:
            writer.writerow({name: getattr(row, name) for name in names})


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="python -m lightning_qlora.quantization.report", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--model", choices=MODELS, default="smollm2", help="model whose Linear layers to quantize")
    parser.add_argument("--blocksize", type=int, choices=BLOCK_SIZES_4BIT, default=64, help="elements per absmax block")
    parser.add_argument("--csv", type=Path, help="also write every per-layer row to this CSV file")
    parser.add_argument("--no-per-layer", action="store_true", help="print only the totals")
    args = parser.parse_args(argv)

    from lightning_qlora.models import ModelNotAvailableError

    try:
        model = _build_model(args.model)
    except ModelNotAvailableError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    stats = report_model(model, args.blocksize, progress=sys.stderr.isatty())
    render(stats, per_layer=not args.no_per_layer, title=f"{args.model}, block {args.blocksize}")
    if args.csv is not None:
        write_csv(stats, args.csv)
        print(f"wrote {len(stats)} rows to {args.csv}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
