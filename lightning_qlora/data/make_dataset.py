"""Deterministic generator of the instruction data sets shipped in ``lightning_qlora/data/tasks/``.

Task ``iso_dates``: a date written in English in one of seven everyday styles
(``"March 5th, 2021"``, ``"the 5th of March, 2021"``, ``"Friday, March 5, 2021"``, ...)
is to be answered with exactly ``YYYY-MM-DD`` (``"2021-03-05"``). Exact match is a
fair and unambiguous check, and the strict output format is what a small instruct model
does not follow out of the box: SmolLM2-135M-Instruct answers with sentences, slashes or
made-up years (about 10% exact match), while a short QLoRA fine-tune learns the format.

Every date appears in exactly one split (train, val and test hold distinct calendar
dates), so the test score measures generalization, not recall. The output depends only
on the seed and the split sizes: running the script twice writes identical bytes, and
``--check`` verifies that committed files are what the script produces.

Example:
    $ python -m lightning_qlora.data.make_dataset                 # rewrite the shipped files
    $ python -m lightning_qlora.data.make_dataset --check         # exit 1 if they differ
    $ python -m lightning_qlora.data.make_dataset --out /tmp/d --train 500
"""

from __future__ import annotations

import argparse
import datetime
import json
import random
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from lightning_qlora.data.records import SPLITS, TASKS_DIR
from lightning_qlora.errors import ConfigError

_NEWLINE = b"\n"

ISO_DATES_INSTRUCTION = "Convert the date to the format YYYY-MM-DD. Answer with the date only."
_MONTHS = (
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
)
_FIRST_DAY = datetime.date(1950, 1, 1)
_LAST_DAY = datetime.date(2049, 12, 31)


class DatasetGenerationError(ConfigError):
    """Bad arguments to the generator (unknown task, impossible split sizes)."""


def _ordinal(day: int) -> str:
    suffix = "th" if 11 <= day % 100 <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(day % 10, "th")
    return f"{day}{suffix}"


def _date_styles(date: datetime.date) -> list[str]:
    """The seven ways a date is written in prompts (weekday names in English, not the locale's)."""
    month, day, year = _MONTHS[date.month - 1], date.day, date.year
    weekday = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")[date.weekday()]
    return [
        f"{month} {day}, {year}",
        f"{day} {month} {year}",
        f"{month[:3]} {day}, {year}",
        f"{month} {_ordinal(day)}, {year}",
        f"the {_ordinal(day)} of {month}, {year}",
        f"{weekday}, {month} {day}, {year}",
        f"{_ordinal(day)} {month} {year}",
    ]


def iso_dates(sizes: dict[str, int], seed: int) -> dict[str, list[dict[str, str]]]:
    """Records ``{"prompt", "response"}`` of the ``iso_dates`` task, per split.

    Args:
        sizes: number of records per split, e.g. ``{"train": 2000, "val": 100, "test": 150}``.
        seed: seed of the private ``random.Random`` (the global RNG is not touched).

    Returns:
        split name -> records, with no calendar date shared between splits.
    """
    total = sum(sizes.values())
    span = (_LAST_DAY - _FIRST_DAY).days + 1
    if total > span:
        raise DatasetGenerationError(f"iso_dates has {span} distinct dates; {total} records were asked for.")
    rng = random.Random(seed)
    offsets = rng.sample(range(span), total)  # distinct dates: no date is in two splits
    records: dict[str, list[dict[str, str]]] = {}
    start = 0
    for split, size in sizes.items():
        chunk = []
        for offset in offsets[start : start + size]:
            date = _FIRST_DAY + datetime.timedelta(days=offset)
            written = rng.choice(_date_styles(date))
            chunk.append({"prompt": f"{ISO_DATES_INSTRUCTION}\nDate: {written}", "response": date.isoformat()})
        records[split] = chunk
        start += size
    return records


#: task name -> generator(sizes, seed); default sizes keep the shipped files small.
TASKS: dict[str, Callable[[dict[str, int], int], dict[str, list[dict[str, str]]]]] = {"iso_dates": iso_dates}
DEFAULT_SIZES: dict[str, int] = {"train": 2000, "val": 100, "test": 150}
DEFAULT_SEED = 1234


def render_jsonl(records: Sequence[dict[str, str]]) -> bytes:
    """One JSON object per line, keys in a fixed order, ``\\n`` line ends, UTF-8."""
    return "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records).encode("utf-8")


def generate(
    task: str = "iso_dates", sizes: dict[str, int] | None = None, seed: int = DEFAULT_SEED
) -> dict[str, bytes]:
    """The JSONL bytes of each split of ``task`` (deterministic in ``task``, ``sizes``, ``seed``).

    Raises:
        DatasetGenerationError: unknown task, unknown split or a negative size.
    """
    if task not in TASKS:
        raise DatasetGenerationError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}.")
    sizes = dict(DEFAULT_SIZES if sizes is None else sizes)
    for split, size in sizes.items():
        if split not in SPLITS or size < 0:
            raise DatasetGenerationError(f"split size {split}={size!r} is invalid; splits are {SPLITS}, sizes >= 0.")
    return {split: render_jsonl(records) for split, records in TASKS[task](sizes, seed).items()}


def write_task(out_dir: Path, files: dict[str, bytes]) -> list[Path]:
    """Write ``<out_dir>/<split>.jsonl`` for each split; returns the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for split, content in files.items():
        path = out_dir / f"{split}.jsonl"
        path.write_bytes(content)
        written.append(path)
    return written


def stale_files(out_dir: Path, files: dict[str, bytes]) -> list[Path]:
    """Paths under ``out_dir`` that are missing or differ from ``files``."""
    stale = []
    for split, content in files.items():
        path = out_dir / f"{split}.jsonl"
        if not path.is_file() or path.read_bytes() != content:
            stale.append(path)
    return stale


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point; returns the process exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="iso_dates", choices=sorted(TASKS))
    parser.add_argument("--out", type=Path, default=None, help="output directory (default: the shipped tasks/<task>/)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    for split in SPLITS:
        parser.add_argument(f"--{split}", type=int, default=DEFAULT_SIZES[split], help=f"records in {split}.jsonl")
    parser.add_argument("--check", action="store_true", help="do not write; exit 1 if the files on disk differ")
    args = parser.parse_args(argv)
    out_dir = args.out if args.out is not None else TASKS_DIR / args.task
    files = generate(args.task, {split: getattr(args, split) for split in SPLITS}, args.seed)
    if args.check:
        stale = stale_files(out_dir, files)
        for path in stale:
            print(f"stale or missing: {path} (regenerate with python -m lightning_qlora.data.make_dataset)")
        return 1 if stale else 0
    for path, content in zip(write_task(out_dir, files), files.values()):
        print(f"wrote {path} ({content.count(_NEWLINE)} records)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
