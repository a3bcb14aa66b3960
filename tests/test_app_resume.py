"""The app resumed mid-epoch: 4 steps + ``ckpt_path=last`` to 6 == 6 steps in one go, bit for bit,
with the run's metrics history (logs/metrics.csv) continued, and predictions written."""

from __future__ import annotations

import csv
import struct
import json
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file

from lightning_qlora.train import run

from .test_train import SMOKE, _compose

QUIET = [*SMOKE, "trainer.log_every_n_steps=1", "evaluate.before=false", "evaluate.after=false"]


def _adapters(run_dir: Path) -> dict[str, torch.Tensor]:
    (weights,) = (run_dir / "adapter").glob("*.safetensors")
    return load_file(weights)


def _rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "logs" / "metrics.csv", newline="") as file:
        return list(csv.DictReader(file))


def _train_losses(rows: list[dict[str, str]]) -> list[tuple[str, str]]:
    return [(row["step"], row["train/loss"]) for row in rows if row.get("train/loss")]


def test_mid_epoch_resume_in_the_app_is_bit_identical_and_continues_the_history(tmp_path):
    straight_dir, parts_dir = tmp_path / "straight", tmp_path / "parts"
    straight = run(_compose([*QUIET, "trainer.max_steps=6"], straight_dir))
    assert straight["steps"] == 6

    run(_compose([*QUIET, "trainer.max_steps=4"], parts_dir))
    first_rows = _rows(parts_dir)
    assert len(_train_losses(first_rows)) == 4
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed = run(_compose([*QUIET, "trainer.max_steps=6", "ckpt_path=last"], parts_dir))
    assert resumed["steps"] == 6
    # step 4 of ~500 batches per epoch: a mid-epoch checkpoint, and the loader is resumable
    assert not [w for w in caught if "not resumable" in str(w.message)]

    a, b = _adapters(straight_dir), _adapters(parts_dir)
    assert a.keys() == b.keys() and a
    for name in a:
        assert torch.equal(a[name], b[name]), name

    rows = _rows(parts_dir)
    losses = _train_losses(rows)
    assert losses[:4] == _train_losses(first_rows)  # the first part's history is still there
    assert len(losses) == 6 and len({step for step, _ in losses}) == 6  # steps 5-6 appended, no duplicates
    assert losses == _train_losses(_rows(straight_dir))  # and it is the uninterrupted run's history


def test_predictions_jsonl_has_both_answers_for_every_example(tmp_path):
    results = run(_compose([*SMOKE, "trainer.max_steps=2", "evaluate.limit=6"], tmp_path))
    lines = (tmp_path / "predictions.jsonl").read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines]
    assert len(records) == 6 == results["after"]["num_examples"]
    for record in records:
        assert {"prompt", "expected", "base_answer", "tuned_answer"} <= set(record)
        assert record["prompt"] and record["expected"]
        assert isinstance(record["base_answer"], str) and isinstance(record["tuned_answer"], str)
    assert sum(r["tuned_answer"] == r["expected"] for r in records) == round(6 * results["after"]["exact_match"])
    assert "predictions.jsonl" in results["files"] and "adapter/" in results["files"]


def _tensorboard_steps(directory: Path, tag: str) -> list[int]:
    """Steps of scalar ``tag`` in every event file of ``directory`` (TFRecord framing, tensorboardX's protos)."""
    from tensorboardX.proto.event_pb2 import Event

    steps = []
    for path in sorted(directory.glob("events.out.tfevents.*")):
        data, offset = path.read_bytes(), 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset : offset + 8])
            event = Event.FromString(data[offset + 12 : offset + 12 + length])
            offset += 12 + length + 4  # length, its CRC, the record, its CRC
            steps += [event.step for value in event.summary.value if value.tag == tag]
    return steps


def test_a_resume_started_in_the_same_second_keeps_the_first_sessions_event_file(tmp_path, monkeypatch):
    """tensorboardX names an event file by the second it opens and opens it for writing: a resumed
    session starting within that second (a fast machine, a crash on start) truncated the first one's."""
    import types

    from tensorboardX import event_file_writer

    monkeypatch.setattr(event_file_writer, "time", types.SimpleNamespace(time=lambda: 1796324481.25))
    board = tmp_path / "tb"
    run(_compose([*QUIET, "logger=tensorboard", "trainer.max_steps=4"], board))
    run(_compose([*QUIET, "logger=tensorboard", "trainer.max_steps=6", "ckpt_path=last"], board))
    assert len(list((board / "tensorboard").glob("events.out.tfevents.1796324481.*"))) == 2
    assert sorted(_tensorboard_steps(board / "tensorboard", "train/loss")) == list(range(6))


def test_tensorboard_and_wandb_continue_the_run_on_resume(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    board, wandb_dir = tmp_path / "tb", tmp_path / "wandb"
    run(_compose([*QUIET, "logger=tensorboard", "trainer.max_steps=4"], board))
    run(_compose([*QUIET, "logger=tensorboard", "trainer.max_steps=6", "ckpt_path=last"], board))
    # two event files, one history: steps 0..5 (Lightning logs 0-based), none twice
    assert len(list((board / "tensorboard").glob("events.out.tfevents.*"))) == 2
    assert sorted(_tensorboard_steps(board / "tensorboard", "train/loss")) == list(range(6))

    import wandb

    run(_compose([*QUIET, "logger=wandb", "trainer.max_steps=2"], wandb_dir))
    # the job ended its run: a later run in this process (a multirun job, a user's script) gets its own
    assert wandb.run is None
    (first,) = (wandb_dir / "wandb").glob("offline-run-*")
    run(_compose([*QUIET, "logger=wandb", "trainer.max_steps=3", "ckpt_path=last"], wandb_dir))
    # offline, W&B writes each session to offline-run-<second>-<run id> (two sessions within one second share
    # it); a continued run keeps the run id (`wandb sync` joins them)
    runs = sorted((wandb_dir / "wandb").glob("offline-run-*"))
    assert first in runs and len(runs) in (1, 2)
    assert {path.name.rsplit("-", 1)[-1] for path in runs} == {first.name.rsplit("-", 1)[-1]}
