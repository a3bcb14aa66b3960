"""Every way a model path can be wrong is a typed error naming the file (or repo id) and the fix, raised
before the model skeleton exists -- so nothing is ever left half-loaded."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import transformers

import lightning_qlora.models.hf_loader as hf_loader
from lightning_qlora.errors import ConfigError, FileFormatError, LightningQLoRAError
from lightning_qlora.models import (
    CheckpointFileError,
    LoaderConfigError,
    ModelNotInCacheError,
    ModelPathNotFoundError,
    UnsupportedArchitectureError,
    load_causal_lm,
)
from lightning_qlora.models.tiny import tiny_tokenizer


@pytest.fixture
def no_skeleton(monkeypatch):
    """Fail the test if the loader gets as far as building the model."""

    def refuse(*args, **kwargs):
        raise AssertionError("the skeleton was built before the error was found")

    monkeypatch.setattr(hf_loader, "build_skeleton", refuse)


@pytest.fixture
def llama_copy(tiny_checkpoints, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_checkpoints["llama"], tmp_path / "llama"))


def _shards(directory: Path) -> list[Path]:
    return sorted(directory.glob("model-*.safetensors"))


def test_missing_path(tmp_path, no_skeleton):
    with pytest.raises(ModelPathNotFoundError, match="does not exist") as caught:
        load_causal_lm(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(caught.value) and isinstance(caught.value, FileFormatError)


def test_repo_id_not_in_the_cache_names_where_it_looked_and_how_to_get_it(tmp_path, no_skeleton):
    with pytest.raises(ModelNotInCacheError) as caught:
        load_causal_lm("some-org/tiny-model", cache_dir=tmp_path)
    message = str(caught.value)
    assert str(tmp_path / "models--some-org--tiny-model") in message and "hf download some-org/tiny-model" in message
    assert isinstance(caught.value, FileFormatError)


def test_repo_id_resolves_from_the_hub_cache_layout(tiny_checkpoints, tmp_path):
    repo = tmp_path / "models--some-org--tiny-llama"
    shutil.copytree(tiny_checkpoints["llama"], repo / "snapshots" / "0123abcd")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    model, tokenizer = load_causal_lm("some-org/tiny-llama", cache_dir=tmp_path, compute_dtype="fp32")
    assert type(model).__name__ == "LlamaForCausalLM" and tokenizer.chat_template


def test_truncated_shard(llama_copy, no_skeleton):
    shard = _shards(llama_copy)[1]
    os.truncate(shard, shard.stat().st_size // 2)
    with pytest.raises(CheckpointFileError, match="truncated") as caught:
        load_causal_lm(llama_copy)
    assert str(shard) in str(caught.value)


def test_index_naming_a_missing_shard(llama_copy, no_skeleton):
    shard = _shards(llama_copy)[0]
    shard.unlink()
    with pytest.raises(CheckpointFileError, match="incomplete") as caught:
        load_causal_lm(llama_copy)
    assert shard.name in str(caught.value) and "model.safetensors.index.json" in str(caught.value)


def test_index_disagreeing_with_the_shards(llama_copy, no_skeleton):
    index = llama_copy / "model.safetensors.index.json"
    content = json.loads(index.read_text())
    key = "model.norm.weight"
    others = sorted(set(content["weight_map"].values()) - {content["weight_map"][key]})
    content["weight_map"][key] = others[0]
    index.write_text(json.dumps(content))
    with pytest.raises(CheckpointFileError, match=key.replace(".", r"\.")):
        load_causal_lm(llama_copy)


def test_unknown_model_type(llama_copy, no_skeleton):
    config = json.loads((llama_copy / "config.json").read_text())
    config["model_type"] = "no_such_architecture"
    (llama_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedArchitectureError, match="config.json") as caught:
        load_causal_lm(llama_copy)
    assert isinstance(caught.value, ConfigError) and "llama" in str(caught.value)


def test_architecture_without_a_causal_lm(tmp_path, no_skeleton):
    transformers.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2).save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    with pytest.raises(UnsupportedArchitectureError, match="ViTConfig.*no causal-LM head") as caught:
        load_causal_lm(tmp_path)
    assert str(tmp_path / "config.json") in str(caught.value)


def test_weights_of_another_config(llama_copy):
    config = json.loads((llama_copy / "config.json").read_text())
    config["intermediate_size"] = 96
    (llama_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointFileError, match=r"gate_proj.weight.*\(128, 64\).*\(96, 64\)"):
        load_causal_lm(llama_copy)


def test_pickled_weights_only_are_refused_without_unpickling(llama_copy, no_skeleton):
    for shard in [*_shards(llama_copy), llama_copy / "model.safetensors.index.json"]:
        shard.unlink()
    (llama_copy / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(CheckpointFileError, match="pytorch_model.bin.*never loaded"):
        load_causal_lm(llama_copy)


def test_missing_tokenizer(llama_copy, no_skeleton):
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (llama_copy / name).unlink(missing_ok=True)
    with pytest.raises(CheckpointFileError, match="tokenizer"):
        load_causal_lm(llama_copy)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"mode": "nf5"}, "mode='nf5'"),
        ({"blocksize": 48}, "blocksize=48"),
        ({"compute_dtype": "fp8"}, "compute_dtype='fp8'"),
        ({"skip_modules": "lm_head"}, "skip_modules"),
    ],
)
def test_bad_arguments(kwargs, match, tmp_path, no_skeleton):
    with pytest.raises(LoaderConfigError, match=match) as caught:
        load_causal_lm(tmp_path, **kwargs)
    assert isinstance(caught.value, LightningQLoRAError)
