"""``benchmarks/main_job.py``'s bookkeeping: the per-seed NF4-minus-float pairs (no model runs)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def main_job(benchmark_module):
    return benchmark_module("main_job")


def _row(arm: str, seed: int, exact_match: float) -> dict:
    return {"arm": arm, "seed": seed, "after": {"exact_match": exact_match}}


def test_nf4_minus_float_pairs_each_nf4_arm_with_its_float_arm_per_seed(main_job):
    rows = [
        _row("ours", 0, 0.96),
        _row("float", 0, 0.98),
        _row("ours", 1, 0.94),
        _row("ours", 1, 0.96),  # a second round: the seed's mean, 95%
        _row("float", 1, 0.95),
        _row("peft", 0, 0.90),
        _row("peft-float", 0, 0.89),
        _row("peft", 1, 0.97),  # no peft-float on seed 1: no pair
    ]
    gaps = main_job.nf4_minus_float(rows)
    assert gaps.keys() == {"ours", "peft"}
    assert gaps["ours"] == pytest.approx({0: -2.0, 1: 0.0})
    assert gaps["peft"] == pytest.approx({0: 1.0})


def test_the_peer_float_arm_is_opt_in_and_paired(main_job):
    assert "peft-float" in main_job.ARMS and "peft-float" not in main_job.DEFAULT_ARMS
    assert main_job.PAIRS == {"ours": "float", "peft": "peft-float"}


def test_every_run_setting_reaches_the_worker(main_job, monkeypatch):
    import argparse
    import subprocess

    seen = []

    def run(command, **kwargs):
        seen.append(command)
        return subprocess.CompletedProcess(command, 0, stdout='RESULT {"train_seconds": 1.0}\n', stderr="")

    monkeypatch.setattr(main_job.subprocess, "run", run)
    args = argparse.Namespace(
        steps=3, eval_examples=10, compute_dtype="fp32", peer_eval="ours", schedule="linear", lora_dropout=0.0
    )
    row = main_job._spawn("peft-float", args, seed=4)
    assert row == {"arm": "peft-float", "seed": 4, "train_seconds": 1.0}
    flags = dict(zip(seen[0][2::2], seen[0][3::2]))
    assert flags == {
        "--worker": "peft-float",
        "--seed": "4",
        "--steps": "3",
        "--eval-examples": "10",
        "--compute-dtype": "fp32",
        "--peer-eval": "ours",
        "--schedule": "linear",
        "--lora-dropout": "0.0",
    }
