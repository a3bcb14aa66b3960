"""The Hydra app: every config composes, every adapter x quant runs, sweeps, W&B, resume, config errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf import OmegaConf

from lightning_qlora.adapters import AdapterConfigError
from lightning_qlora.data import DatasetNotFoundError
from lightning_qlora.errors import ConfigError
from lightning_qlora.train import CONFIG_DIR, run

GROUPS = {
    group: sorted(p.stem for p in (Path(CONFIG_DIR) / group).glob("*.yaml"))
    for group in (
        "model",
        "data",
        "quant",
        "adapter",
        "optimizer",
        "scheduler",
        "strategy",
        "trainer",
        "logger",
        "callbacks",
        "experiment",
    )
}
SMOKE = ["experiment=smoke", "logger=csv"]


def _compose(overrides: list[str], run_dir: Path | str = "/tmp/unused", hydra_config: bool = False):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("train", overrides=[*overrides, f"run_dir={run_dir}"], return_hydra_config=hydra_config)


def test_config_groups_are_the_documented_ones():
    assert GROUPS["quant"] == ["fp4", "fp4_dq", "nf4", "nf4_dq", "none"]
    assert set(GROUPS["adapter"]) == {
        "lora",
        "lora_plus",
        "vera",
        "lora_fa",
        "dora",
        "delta_lora",
        "adalora",
        "lora_drop",
        "moe_lora",
    }
    assert {"auto", "paged", "ddp"} <= set(GROUPS["strategy"]) and {"cpu", "gpu", "debug"} <= set(GROUPS["trainer"])
    assert {"csv", "tensorboard", "wandb"} <= set(GROUPS["logger"])
    assert GROUPS["scheduler"] == ["constant", "cosine", "linear"] and not _compose([]).scheduler  # constant


@pytest.mark.parametrize(("group", "option"), [(g, o) for g, options in GROUPS.items() for o in options])
def test_every_config_option_composes_and_resolves(group, option):
    data_override = ["data.train_path=/x/train.jsonl"] if (group, option) == ("data", "jsonl") else []
    cfg = _compose([f"{group}={option}", *data_override])
    container = OmegaConf.to_container(cfg, resolve=True)
    assert container["run_dir"] == "/tmp/unused" and "_target_" in container["trainer"]


@pytest.mark.parametrize("extra", [["hparams_search=optuna"], ["launcher=submitit_local"], ["launcher=submitit_slurm"]])
def test_sweeper_and_launcher_configs_compose(extra):
    cfg = _compose(extra, hydra_config=True)
    target = cfg.hydra.sweeper._target_ if "hparams_search" in extra[0] else cfg.hydra.launcher._target_
    assert target.startswith(("hydra_plugins.hydra_optuna_sweeper", "hydra_plugins.hydra_submitit_launcher"))


@pytest.mark.parametrize("quant", GROUPS["quant"])
@pytest.mark.parametrize("adapter", GROUPS["adapter"])
def test_fast_dev_run_of_every_adapter_and_quant(adapter, quant, tmp_path):
    overrides = [*SMOKE, "trainer=debug", f"adapter={adapter}", f"quant={quant}", "logger=csv"]
    if adapter == "lora_drop":
        overrides.append("callbacks.lora_drop.stage1_steps=2")  # fast_dev_run stops before the switch
    if adapter == "adalora":
        overrides += [
            "callbacks.adalora_budget.total_steps=10",
            "callbacks.adalora_budget.final_warmup=1",
            "callbacks.adalora_budget.init_warmup=1",
        ]
    results = run(_compose(overrides, tmp_path))
    assert results["steps"] == 1
    assert (tmp_path / "adapter" / "adapter.json").is_file()


def test_main_job_path_end_to_end_on_the_tiny_model(tmp_path):
    results = run(_compose(SMOKE, tmp_path))
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["steps"] == 4 and 0.0 <= saved["after"]["exact_match"] <= 1.0
    assert saved["after"]["loss"] < saved["before"]["loss"]  # 4 steps of LoRA on the answer tokens
    assert (tmp_path / "loss_curves.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "adapter_peft" / "adapter_config.json").is_file()
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file() and results["adapter_bytes"] > 0

    resumed = run(_compose([*SMOKE, "trainer.max_steps=6", "ckpt_path=last", "evaluate.before=false"], tmp_path))
    assert resumed["steps"] == 6


def test_paged_strategy_pages_the_optimizer_state(tmp_path):
    results = run(
        _compose(
            [*SMOKE, "strategy=paged", "evaluate.before=false", "evaluate.after=false", "trainer.max_steps=2"], tmp_path
        )
    )
    assert results["optimizer"] == "PagedAdamW" and results["steps"] == 2
    assert (tmp_path / "optimizer_pages").is_dir()


def test_wandb_offline_run_files_are_written(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    run(_compose([*SMOKE, "logger=wandb", "evaluate.before=false", "trainer.max_steps=2"], tmp_path))
    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    assert list(run_dir.glob("*.wandb"))  # the run's history, config, images and the adapter artifact


def test_tensorboard_event_files_are_written(tmp_path):
    run(
        _compose(
            [*SMOKE, "logger=tensorboard", "evaluate.before=false", "evaluate.after=false", "trainer.max_steps=2"],
            tmp_path,
        )
    )
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_two_job_multirun_from_another_directory(tmp_path):
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONWARNINGS": "ignore"}
    # lightning_qlora.cli is the console script's entry point (Hydra then finds conf/ as a package)
    command = [
        sys.executable,
        "-m",
        "lightning_qlora.cli",
        "-m",
        *SMOKE,
        "adapter=lora,dora",
        "trainer=debug",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
    ]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    jobs = sorted((tmp_path / "sweep").glob("*/adapter/adapter.json"))
    assert [json.loads(p.read_text())["config"]["method"] for p in jobs] == ["lora", "dora"]


def test_config_mistakes_fail_before_training(tmp_path):
    with pytest.raises(MissingConfigException, match="lorax"):
        _compose(["adapter=lorax"])
    with pytest.raises(ConfigCompositionException, match="rr"):
        _compose(["adapter.rr=4"])
    with pytest.raises(AdapterConfigError, match="r='abc'|r=.abc."):
        run(_compose([*SMOKE, "adapter.r=abc"], tmp_path))
    with pytest.raises(DatasetNotFoundError, match="/nowhere/train.jsonl"):
        run(_compose([*SMOKE, "data=jsonl", "data.train_path=/nowhere/train.jsonl"], tmp_path))
    with pytest.raises(ConfigError, match="host_memory='fast'"):
        run(_compose([*SMOKE, "host_memory=fast"], tmp_path))
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize("mode", ["reuse", "release", "glibc"])
def test_the_app_sets_the_host_allocator_it_is_told_to_first(mode, tmp_path, monkeypatch):
    from lightning_qlora import train

    called = []
    monkeypatch.setitem(train.HOST_MEMORY, "reuse", lambda: called.append("reuse"))
    monkeypatch.setitem(train.HOST_MEMORY, "release", lambda: called.append("release"))
    cfg = _compose([*SMOKE, f"host_memory={mode}", "data=jsonl", "data.train_path=/nowhere/train.jsonl"], tmp_path)
    with pytest.raises(DatasetNotFoundError):  # stops right after the allocator setting, before any model load
        run(cfg)
    assert called == ([] if mode == "glibc" else [mode])
    assert _compose([]).host_memory == "reuse"  # the default


@pytest.mark.slow
def test_submitit_local_launcher_runs_a_job(tmp_path):
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONWARNINGS": "ignore"}
    command = [
        sys.executable,
        "-m",
        "lightning_qlora.cli",
        "-m",
        "launcher=submitit_local",
        *SMOKE,
        "trainer=debug",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
    ]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (results,) = (tmp_path / "sweep").glob("*/results.json")
    assert json.loads(results.read_text())["steps"] == 1
    assert list((tmp_path / "sweep" / ".submitit").rglob("*_log.out"))  # it ran as a submitit job
