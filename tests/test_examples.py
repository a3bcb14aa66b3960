"""The examples run as documented."""

from __future__ import annotations

import json
import re
import runpy

import pytest
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_quantize_and_share_with_bitsandbytes(capsys):
    runpy.run_path(str(EXAMPLES / "quantize_and_share_with_bitsandbytes.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "bits/param" in out and "codes bit-exact: True" in out
    difference, bound = re.search(r"max output difference (\S+) \(round-off bound (\S+)\)", out).groups()
    assert float(difference) <= float(bound)


@pytest.mark.parametrize("method", ["lora", "vera"])
def test_adapters_on_nf4(method, capsys, monkeypatch):
    monkeypatch.setattr("sys.argv", ["adapters_on_nf4.py", method])
    runpy.run_path(str(EXAMPLES / "adapters_on_nf4.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "quantized 14 Linear layers" in out and "step 19" in out and "saved our adapter" in out


@pytest.mark.parametrize("method", ["adalora", "lora_drop"])
def test_callbacks_example(method, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("sys.argv", ["callbacks_adalora_and_lora_drop.py", method, str(tmp_path)])
    runpy.run_path(str(EXAMPLES / "callbacks_adalora_and_lora_drop.py"), run_name="__main__")
    assert "plots and metrics in" in capsys.readouterr().out
    if method == "adalora":
        (ranks,) = tmp_path.rglob("adalora_ranks.json")
        assert sum(json.loads(ranks.read_text()).values()) == 3 * 28  # target_rank 3 x 28 adapted layers
        assert list(tmp_path.rglob("adalora_ranks.png"))
    else:
        assert list(tmp_path.rglob("lora_drop_importance.png"))


@pytest.mark.slow
def test_finetune_with_trainer_example(capsys, monkeypatch):
    monkeypatch.setattr("sys.argv", ["finetune_with_trainer.py"])
    runpy.run_path(str(EXAMPLES / "finetune_with_trainer.py"), run_name="__main__")
    assert "test exact match" in capsys.readouterr().out


@pytest.mark.slow
def test_finetune_with_fabric_example(capsys, monkeypatch):
    monkeypatch.setattr("sys.argv", ["finetune_with_fabric.py"])
    runpy.run_path(str(EXAMPLES / "finetune_with_fabric.py"), run_name="__main__")
    out = capsys.readouterr().out
    first, last = (float(v) for v in out.split("loss ")[-1].split(" over")[0].split(" -> "))
    assert last < first


@pytest.mark.slow
def test_plain_lightning_module_example(capsys, monkeypatch):
    monkeypatch.setattr("sys.argv", ["plain_lightning_module.py"])
    runpy.run_path(str(EXAMPLES / "plain_lightning_module.py"), run_name="__main__")
    assert "every tensor identical (moved 4-bit bases included): True" in capsys.readouterr().out


@pytest.mark.slow
def test_wandb_offline_example(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["wandb_offline.py", str(tmp_path)])
    runpy.run_path(str(EXAMPLES / "wandb_offline.py"), run_name="__main__")
    (run,) = (tmp_path / "wandb").glob("offline-run-*")
    assert list(run.glob("*.wandb")) and (tmp_path / "loss_curves.png").is_file()


@pytest.mark.slow
def test_sweep_example(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["sweep.py", str(tmp_path)])
    runpy.run_path(str(EXAMPLES / "sweep.py"), run_name="__main__")
    rows = [line for line in capsys.readouterr().out.splitlines() if line[:1].isdigit()]
    assert len(rows) == 6 and {row.split()[1] for row in rows} == {"lora", "dora", "vera"}
