"""Paged optimizers under DDP with 2 CPU processes (gloo) and NF4Precision match one process with the same global batch."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("ddp_worker.py")
ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), **extra)


@pytest.mark.slow
def test_two_process_paged_ddp_matches_single_process(tmp_path):
    port, world = _free_port(), 2
    processes = []
    for rank in range(world):
        env = _env(
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            WORLD_SIZE=str(world),
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            LOCAL_WORLD_SIZE=str(world),
            GROUP_RANK="0",
            TORCHELASTIC_RUN_ID="lightning-qlora-paged-test",
        )
        processes.append(
            subprocess.Popen(
                [sys.executable, str(WORKER), str(world), "2", str(tmp_path / "ddp.json")],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outputs = [p.communicate(timeout=600)[0] for p in processes]
    for process, output in zip(processes, outputs, strict=True):
        assert process.returncode == 0, output[-3000:]
    single = tmp_path / "single.json"
    subprocess.run([sys.executable, str(WORKER), "1", "4", str(single)], check=True, capture_output=True, env=_env())
    ddp_losses, single_losses = json.loads((tmp_path / "ddp.json").read_text()), json.loads(single.read_text())
    assert len(ddp_losses) == len(single_losses) == 4
    # same global batches, gradients averaged: equal up to the order of fp32 reductions
    for step, (ddp, one) in enumerate(zip(ddp_losses, single_losses, strict=True)):
        assert abs(ddp - one) < 1e-4 * abs(one), (step, ddp, one)
    assert ddp_losses[-1] < ddp_losses[0]
