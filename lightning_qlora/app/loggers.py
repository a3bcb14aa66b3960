"""Loggers that continue a run's history on resume instead of deleting or overwriting it.

:class:`ContinuingCSVLogger`:

Lightning's ``CSVLogger`` removes an existing ``metrics.csv`` when it starts ("Previous log files
in this directory will be deleted"), so a run resumed with ``ckpt_path=last`` in its own run dir
loses the history of the steps before the checkpoint. :class:`ContinuingCSVLogger` keeps the rows
logged before the resumed run's first logged step and appends after them; rows at that step or
later (logged by an interrupted run after its last checkpoint, and logged again now) are replaced,
so no step appears twice.

:class:`SessionTensorBoardLogger`: tensorboardX names an event file
``events.out.tfevents.<second>.<host>`` and opens it for writing, so a resumed session that starts
within the same second as the one before it (a fast machine, a crash right after start) truncated
the earlier session's file. Each session of this logger writes its own file (pid and a counter in
the suffix); TensorBoard reads all the files of the directory as one run.

Example:
    >>> logger = ContinuingCSVLogger(save_dir="runs/x", name="logs", version="")
    >>> L.Trainer(logger=logger).fit(module, ckpt_path="runs/x/checkpoints/last.ckpt")
"""

from __future__ import annotations

import csv
import io
import itertools
import os
from typing import Any

from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from typing_extensions import override

from lightning_qlora.atomic import atomic_write_text


def _step(row: dict[str, Any]) -> float:
    try:
        return float(row.get("step") or "nan")
    except ValueError:
        return float("nan")


class _ContinuingExperimentWriter(ExperimentWriter):
    """``ExperimentWriter`` that reads the existing ``metrics.csv`` and trims it at the first new step."""

    @override
    def _check_log_dir_exists(self) -> None:
        self._previous: list[dict[str, str]] | None = None
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as file:
                reader = csv.DictReader(file)
                self._previous = list(reader)
                self.metrics_keys = sorted(reader.fieldnames or [])

    @override
    def save(self) -> None:
        if self.metrics and self._previous is not None:
            first_new = min(_step(row) for row in self.metrics)
            # rows of an interrupted run past its last checkpoint come again now: keep the earlier ones only
            kept = [row for row in self._previous if not _step(row) >= first_new]
            text = io.StringIO()
            writer = csv.DictWriter(text, fieldnames=self.metrics_keys)
            writer.writeheader()
            writer.writerows(kept)
            atomic_write_text(self.metrics_file_path, text.getvalue())
            self._previous = None
        super().save()


class ContinuingCSVLogger(CSVLogger):
    """``CSVLogger`` (same arguments) whose ``metrics.csv`` continues across resumes of one run dir."""

    @property
    @override
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is not None:
            return self._experiment
        self._fs.makedirs(self.root_dir, exist_ok=True)
        self._experiment = _ContinuingExperimentWriter(log_dir=self.log_dir)
        return self._experiment


#: numbers the loggers of this process, so two sessions in one process and second differ too
_SESSIONS = itertools.count()


class SessionTensorBoardLogger(TensorBoardLogger):
    """``TensorBoardLogger`` (same arguments) that never overwrites an earlier session's event file.

    Unless ``filename_suffix`` is given, each logger's event file ends in ``.<pid>.<n>``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("filename_suffix", f".{os.getpid()}.{next(_SESSIONS)}")
        super().__init__(*args, **kwargs)
