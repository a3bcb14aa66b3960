"""DDP and FSDP with 2 CPU processes (gloo) give the loss curve of one process with the same global batch."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("ddp_worker.py")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run_ranks(world: int, batch: int, out: Path, strategy: str = "ddp", *extra: str) -> None:
    port = _free_port()
    processes = []
    for rank in range(world):
        env = dict(
            os.environ,
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            WORLD_SIZE=str(world),
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            LOCAL_WORLD_SIZE=str(world),
            GROUP_RANK="0",
            OMP_NUM_THREADS="1",
        )
        # torchelastic-style variables make Lightning use these processes instead of launching its own
        env["TORCHELASTIC_RUN_ID"] = "lightning-qlora-test"
        processes.append(
            subprocess.Popen(
                [sys.executable, str(WORKER), str(world), str(batch), str(out), strategy, *extra],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outputs = [p.communicate(timeout=600)[0] for p in processes]
    for process, output in zip(processes, outputs, strict=True):
        assert process.returncode == 0, output[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_process_ddp_matches_single_process(tmp_path, strategy):
    _run_ranks(2, 2, tmp_path / "ddp.json", strategy)
    single = tmp_path / "single.json"
    subprocess.run(
        [sys.executable, str(WORKER), "1", "4", str(single)],
        check=True,
        capture_output=True,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    ddp_losses, single_losses = json.loads((tmp_path / "ddp.json").read_text()), json.loads(single.read_text())
    assert len(ddp_losses) == len(single_losses) == 8
    # Same global batches, gradients averaged over ranks: the curves agree up to the order of
    # fp32 reductions (mean of two per-rank means vs one mean; all-reduced gradients).
    for step, (ddp, single) in enumerate(zip(ddp_losses, single_losses, strict=True)):
        assert abs(ddp - single) < 1e-4 * abs(single), (step, ddp, single)
    assert ddp_losses[-1] < ddp_losses[0]
    if strategy == "fsdp":  # each rank holds half of the float parameters; the 4-bit weights stay whole
        for rank in range(2):
            local, full, packed_4bit = json.loads((tmp_path / f"ddp.json.rank{rank}.sharding").read_text())
            assert local == -(-full // 2) and packed_4bit > 0


@pytest.mark.slow
def test_fsdp_resume_matches_the_uninterrupted_run(tmp_path):
    _run_ranks(2, 2, tmp_path / "full.json", "fsdp", "8")
    _run_ranks(2, 2, tmp_path / "first.json", "fsdp", "4", str(tmp_path / "checkpoints"))
    (checkpoint,) = (tmp_path / "checkpoints").glob("*step=4*")  # a sharded checkpoint directory on CPU
    assert checkpoint.is_dir()
    _run_ranks(2, 2, tmp_path / "resumed.json", "fsdp", "8", "-", str(checkpoint))
    full = json.loads((tmp_path / "full.json").read_text())
    resumed = json.loads((tmp_path / "resumed.json").read_text())
    assert resumed == full[4:]  # bit-identical: weights and optimizer state restored exactly
