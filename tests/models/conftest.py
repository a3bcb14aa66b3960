"""One tiny sharded checkpoint per family, written once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.models.checkpoints import FAMILIES, write_tiny_checkpoint


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_checkpoints")
    return {family: write_tiny_checkpoint(family, root / family) for family in FAMILIES}
