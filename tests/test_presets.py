"""Every shipped experiment preset runs to its end with the step counts it brings (issue 13, point 9)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from lightning_qlora.train import CONFIG_DIR, run

PRESETS = sorted(p.stem for p in (Path(CONFIG_DIR) / "experiment").glob("*.yaml"))
# the presets' own settings, on the tiny in-memory model and without the evaluations (seconds, not minutes)
TINY = [
    "model=tiny_llama",
    "logger=csv",
    "evaluate.before=false",
    "evaluate.after=false",
    "data.batch_size=2",
    "data.max_length=256",
    "trainer.val_check_interval=null",
    "trainer.limit_val_batches=0",
]


@pytest.mark.slow
@pytest.mark.parametrize("preset", [p for p in PRESETS if p not in ("smoke", "smollm2_iso_dates")])
def test_preset_fits_with_its_own_step_count(preset, tmp_path):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[f"experiment={preset}", *TINY, f"run_dir={tmp_path}"])
    max_steps = cfg.trainer.max_steps
    results = run(cfg)
    assert results["steps"] == max_steps, results
