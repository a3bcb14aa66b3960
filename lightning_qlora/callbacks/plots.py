"""PNG figures written by the callbacks, and handing them to whatever loggers are active.

Matplotlib runs on its non-interactive ``Agg`` backend, so plotting works on headless machines.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

_LAYER_INDEX = re.compile(r"\.(\d+)\.")


def split_layer_name(name: str) -> tuple[str, str]:
    """``"model.layers.3.self_attn.q_proj"`` -> ``("3", "q_proj")``: (block, weight type).

    Names without a block number keep everything before the last component as the block.
    """
    match = _LAYER_INDEX.search(f".{name}.")
    kind = name.rsplit(".", 1)[-1]
    if match is None:
        return name.rpartition(".")[0] or name, kind
    return match.group(1), kind


def rank_heatmap(ranks: dict[str, int], path: Path, title: str = "AdaLoRA final ranks") -> Path:
    """Blocks x weight types, each cell the rank kept there (as in the AdaLoRA paper's Figure 1)."""
    cells = {split_layer_name(name): rank for name, rank in ranks.items()}
    blocks = sorted({b for b, _ in cells}, key=lambda b: (not b.isdigit(), int(b) if b.isdigit() else 0, b))
    kinds = sorted({k for _, k in cells})
    grid = [[cells.get((b, k), float("nan")) for b in blocks] for k in kinds]
    figure, axes = plt.subplots(figsize=(max(4.0, 0.45 * len(blocks) + 2), max(2.5, 0.45 * len(kinds) + 1.2)))
    image = axes.imshow(grid, cmap="YlGn", aspect="auto")
    axes.set_xticks(range(len(blocks)), blocks)
    axes.set_yticks(range(len(kinds)), kinds)
    axes.set_xlabel("layer")
    axes.set_title(title)
    if len(blocks) * len(kinds) <= 400:  # numbers stay readable
        for row, kind in enumerate(kinds):
            for column, block in enumerate(blocks):
                if (block, kind) in cells:
                    axes.text(column, row, str(cells[block, kind]), ha="center", va="center", fontsize=7)
    figure.colorbar(image, ax=axes, label="rank")
    return _save(figure, path)


def importance_bars(importances: dict[str, float], kept: set[str], path: Path, threshold: float | None) -> Path:
    """Normalized importance per layer, kept layers highlighted, sorted from most important."""
    total = sum(importances.values()) or 1.0
    order = sorted(importances, key=importances.get, reverse=True)
    shares = [importances[name] / total for name in order]
    figure, axes = plt.subplots(figsize=(max(5.0, 0.18 * len(order) + 2), 4.0))
    axes.bar(range(len(order)), shares, color=["tab:green" if n in kept else "tab:gray" for n in order])
    axes.set_xticks(range(len(order)), order, rotation=90, fontsize=6)
    axes.set_ylabel("normalized importance")
    caption = f"LoRA-drop: {len(kept)} of {len(order)} layers keep their own adapter"
    axes.set_title(caption + (f" (cumulative importance >= {threshold})" if threshold is not None else ""))
    return _save(figure, path)


def loss_curves(curves: dict[str, tuple[list[int], list[float]]], path: Path, title: str = "loss") -> Path:
    """One line per named series of ``(steps, values)``."""
    figure, axes = plt.subplots(figsize=(6.0, 4.0))
    for label, (steps, values) in curves.items():
        axes.plot(steps, values, label=label, marker="o" if len(steps) < 30 else None)
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.set_title(title)
    axes.legend()
    axes.grid(alpha=0.3)
    return _save(figure, path)


def _save(figure: Any, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def log_image(trainer: Any, key: str, path: Path) -> None:
    """Send the PNG at ``path`` to every logger that takes images (W&B, TensorBoard)."""
    for logger in trainer.loggers:
        if hasattr(logger, "log_image"):  # WandbLogger
            logger.log_image(key=key, images=[str(path)], step=trainer.global_step)
        elif hasattr(getattr(logger, "experiment", None), "add_image"):  # TensorBoardLogger
            image = plt.imread(str(path))[..., :3]
            logger.experiment.add_image(key, image, global_step=trainer.global_step, dataformats="HWC")


def log_dir(trainer: Any) -> Path:
    """Where a run's files go: the logger's directory, else the trainer's root directory."""
    return Path(trainer.log_dir or trainer.default_root_dir)
