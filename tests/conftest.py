"""Shared test setup: offline, deterministic, CPU."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _no_leaked_lightning_seed(monkeypatch: pytest.MonkeyPatch) -> None:
    # seed_everything(...) exports PL_GLOBAL_SEED / PL_SEED_WORKERS for child processes; left set by
    # one test (the app seeds itself), it would re-seed the DDP workers another test spawns.
    for name in ("PL_GLOBAL_SEED", "PL_SEED_WORKERS"):
        monkeypatch.delenv(name, raising=False)
