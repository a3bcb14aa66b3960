"""The streaming property: loading a ~300M-parameter checkpoint never holds a float copy of the model.

Bound (issue 14): peak RSS growth <= final model bytes + 2 x the largest tensor in fp32 + 256 MB.
Here that is ~0.91 GB, the bf16 file alone is 0.65 GB and its first shard 0.58 GB: reading
shards whole, building the float model first (1.3 GB in fp32), or keeping a shard's pages
resident until the shard is done all break it (measured: 0.62 GB with the pages given back
tensor by tensor, 1.01 GB without).
Measured in a fresh subprocess (``VmHWM``), so nothing else this test session allocated counts.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import transformers

from lightning_qlora.models.synthetic import write_synthetic_checkpoint
from lightning_qlora.models.tiny import tiny_tokenizer

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_peak_rss_growth_of_a_300m_parameter_load_is_bounded(tmp_path):
    config = transformers.LlamaConfig(
        vocab_size=32000,
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=20,
        num_attention_heads=16,
        num_key_value_heads=16,
        tie_word_embeddings=False,
    )
    write_synthetic_checkpoint(config, tmp_path, shard_bytes=560 << 20)
    tiny_tokenizer().save_pretrained(tmp_path)
    parameters = json.loads((tmp_path / "model.safetensors.index.json").read_text())["metadata"]["total_size"] // 2
    assert 300e6 < parameters < 340e6 and len(list(tmp_path.glob("model-*.safetensors"))) == 2

    done = subprocess.run(
        [sys.executable, "-m", "tests.models.rss_worker", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    growth = (report["peak_kb"] - report["baseline_kb"]) * 1024
    largest_fp32 = 32000 * 1024 * 4  # the embedding (and lm_head)
    bound = report["model_bytes"] + 2 * largest_fp32 + (256 << 20)
    assert 0.35e9 < report["model_bytes"] < 0.45e9  # 4-bit Linear weights + fp32 embeddings, head and norms
    assert growth <= bound, f"peak RSS grew {growth / 1e6:.0f} MB, bound {bound / 1e6:.0f} MB ({report})"
