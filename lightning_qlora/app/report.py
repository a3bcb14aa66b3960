"""What a run tells its user at the end: ``predictions.jsonl``, a few predictions, the files written,
and the results table -- with the run dir printed in full (never cut at the terminal's width).

Example:
    >>> write_predictions(run_dir / "predictions.jsonl", examples, base_answers, tuned_answers)
    >>> print_report(results, run_dir)
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from lightning_qlora.atomic import atomic_write_text
from lightning_qlora.data import InstructionExample

PREDICTIONS_FILE = "predictions.jsonl"

#: what each file or folder of a run dir is (listed in this order, unknown ones after)
FILE_ROLES = {
    "results.json": "the numbers below, as JSON",
    PREDICTIONS_FILE: "prompt, expected, base answer, tuned answer for every test example",
    "adapter/": "the trained adapter (lightning_qlora format; `lightning-qlora serve adapters_dir=<run dir>`)",
    "adapter_peft/": "the same adapter in PEFT's format (PeftModel.from_pretrained)",
    "loss_curves.png": "training and validation loss",
    "logs/": "metrics.csv (every logged step) and hparams.yaml",
    "checkpoints/": "last.ckpt and periodic checkpoints (resume: ckpt_path=last)",
    "tensorboard/": "TensorBoard event files (tensorboard --logdir <run dir>)",
    "wandb/": "W&B offline run (wandb sync <run dir>/wandb/offline-run-*)",
    "optimizer_pages/": "the paged optimizer's state pages",
    ".hydra/": "the composed config and overrides of this run",
    "train.log": "the run's log messages (Hydra's job log)",
}


def _prompt_text(example: InstructionExample) -> str:
    users = [m["content"] for m in example.prompt_messages if m.get("role") == "user"]
    return users[-1] if users else example.prompt_messages[-1]["content"]


def write_predictions(
    path: Path, examples: Sequence[InstructionExample], base: Sequence[str] | None, tuned: Sequence[str] | None
) -> list[dict[str, Any]]:
    """One JSON line per example: ``prompt``, ``expected``, ``base_answer``, ``tuned_answer`` (null if not evaluated)."""
    records = []
    for index, example in enumerate(examples):
        records.append(
            {
                "prompt": _prompt_text(example),
                "expected": example.reference,
                "base_answer": base[index] if base is not None else None,
                "tuned_answer": tuned[index] if tuned is not None else None,
                "source": example.source,
            }
        )
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return records


def list_run_files(run_dir: Path, also: Sequence[str] = ()) -> list[str]:
    """Top-level entries of the run dir (folders with a trailing ``/``) and ``also``, the known ones first."""
    # hidden entries are the atomic writers' lock files; .hydra/ is the one a user needs
    names = {
        p.name + "/" if p.is_dir() else p.name
        for p in run_dir.iterdir()
        if not p.name.startswith(".") or p.name == ".hydra"
    } | set(also)
    order = list(FILE_ROLES)
    return sorted(names, key=lambda n: (order.index(n) if n in order else len(order), n))


def _size(path: Path) -> str:
    files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
    total = sum(p.stat().st_size for p in files)
    size = f"{total / 1e6:.2f} MB" if total >= 1e5 else f"{total / 1e3:.1f} kB"
    return f"{len(files)} file{'s' if len(files) != 1 else ''}, {size}" if path.is_dir() else size


def _print_predictions(console: Console, records: Sequence[dict[str, Any]], shown: int) -> None:
    if not records or not shown:
        return
    table = Table(title=f"predictions (first {min(shown, len(records))} of {len(records)}; all in {PREDICTIONS_FILE})")
    table.add_column("prompt", overflow="fold", ratio=3)
    table.add_column("expected", overflow="fold", ratio=1)
    table.add_column("base answer", overflow="fold", ratio=1)
    table.add_column("tuned answer", overflow="fold", ratio=1)
    for record in records[:shown]:
        table.add_row(
            *(
                str(record[key]) if record[key] is not None else "–"
                for key in ("prompt", "expected", "base_answer", "tuned_answer")
            )
        )
    console.print(table)


def _results_table(results: dict[str, Any]) -> Table:
    table = Table(title="lightning_qlora run")
    table.add_column("metric", overflow="fold")
    table.add_column("value", justify="right", overflow="fold")
    before, after = results.get("before"), results.get("after")
    if before:
        table.add_row("test exact match, base (quantized)", f"{100 * before['exact_match']:.1f}%")
        table.add_row("test answer loss, base", f"{before['loss']:.4f}")
    if after:
        table.add_row("test exact match, fine-tuned", f"{100 * after['exact_match']:.1f}%")
        table.add_row("test answer loss, fine-tuned", f"{after['loss']:.4f}")
    table.add_row("training steps", str(results["steps"]))
    table.add_row("training time", f"{results['train_seconds']:.1f} s")
    table.add_row("total time", f"{results['total_seconds']:.1f} s")
    table.add_row("peak memory (RSS)", f"{results['peak_rss_mb']:.0f} MB")
    table.add_row("trainable parameters", f"{results['trainable_params']:,}")
    if "adapter_bytes" in results:
        table.add_row("adapter size", f"{results['adapter_bytes'] / 1e6:.2f} MB")
    return table


def print_report(
    results: dict[str, Any],
    run_dir: Path,
    predictions: Sequence[dict[str, Any]] = (),
    shown_predictions: int = 5,
    console: Console | None = None,
) -> None:
    """Print a few predictions, the results table, the run dir in full and what is in it."""
    console = console or Console()
    _print_predictions(console, predictions, shown_predictions)
    console.print(_results_table(results))
    # on its own line, never inside a table cell: the one pointer to everything above
    console.print(f"run dir: {run_dir.resolve()}", soft_wrap=True, highlight=False)
    for name in results.get("files", list_run_files(run_dir)):
        role = FILE_ROLES.get(name, "")
        console.print(f"  {name:<18} {_size(run_dir / name):>20}  {role}", soft_wrap=True, highlight=False)
