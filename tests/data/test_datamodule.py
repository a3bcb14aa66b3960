"""InstructionDataModule: padded batches QLoRAModule consumes, configuration errors, determinism."""

from __future__ import annotations

import logging

import lightning as L
import pytest
import torch

from lightning_qlora.adapters import LoRAConfig
from lightning_qlora.data import IGNORE_INDEX, DatasetNotFoundError, InstructionDataConfigError, InstructionDataModule
from lightning_qlora.module import QLoRAModule
from lightning_qlora.plugins import NF4Precision

from .helpers import make_tiny_llama, write_jsonl

RECORDS = [f'{{"prompt": "q{i}{"x" * i}", "response": "a{i}"}}' for i in range(10)]


@pytest.fixture
def data_files(tmp_path):
    return {split: write_jsonl(tmp_path / f"{split}.jsonl", RECORDS) for split in ("train", "val", "test")}


def test_train_batches_are_padded_dicts_with_masked_labels(char_tokenizer, data_files):
    data = InstructionDataModule(char_tokenizer, train_path=data_files["train"], batch_size=4, seed=0)
    data.setup("fit")
    batches = list(data.train_dataloader())
    assert [b["input_ids"].shape[0] for b in batches] == [4, 4, 2]
    for batch in batches:
        assert sorted(batch) == ["attention_mask", "input_ids", "labels"]
        lengths = batch["attention_mask"].sum(1)
        assert batch["input_ids"].shape[1] == int(lengths.max())  # padded to the batch's longest
        for row, length in enumerate(lengths.tolist()):
            assert (batch["labels"][row, length:] == IGNORE_INDEX).all()
            supervised = batch["labels"][row, :length][batch["labels"][row, :length] != IGNORE_INDEX]
            # "a<i>" + <|im_end|> + "\n": 4 tokens, the end of turn (= the pad id) included
            assert len(supervised) == 4 and supervised[2].item() == char_tokenizer.eos_token_id


def test_shuffle_is_seeded(char_tokenizer, data_files):
    def first_epoch(seed: int) -> list[list[int]]:
        data = InstructionDataModule(char_tokenizer, train_path=data_files["train"], batch_size=3, seed=seed)
        return [b["input_ids"][:, 7].tolist() for b in data.train_dataloader()]  # "q<i>": the digit

    assert first_epoch(0) == first_epoch(0)
    assert first_epoch(0) != first_epoch(1)


def test_eval_loaders_keep_file_order(char_tokenizer, data_files):
    data = InstructionDataModule(
        char_tokenizer, val_path=data_files["val"], test_path=data_files["test"], batch_size=2, eval_batch_size=5
    )
    data.setup("test")
    assert [e.reference for e in data.examples["test"]] == [f"a{i}" for i in range(10)]
    assert [b["input_ids"].shape[0] for b in data.test_dataloader()] == [5, 5]
    assert len(data.val_dataloader()) == 2


def test_configuration_errors(char_tokenizer, data_files, tmp_path):
    with pytest.raises(InstructionDataConfigError, match="at least one of train_path"):
        InstructionDataModule(char_tokenizer)
    with pytest.raises(InstructionDataConfigError, match="batch_size=0"):
        InstructionDataModule(char_tokenizer, train_path=data_files["train"], batch_size=0)
    data = InstructionDataModule(char_tokenizer, train_path=data_files["train"])
    with pytest.raises(InstructionDataConfigError, match="no test_path"):
        data.test_dataloader()
    assert data.val_dataloader() == []  # no val split: Lightning skips validation
    missing = InstructionDataModule(char_tokenizer, train_path=tmp_path / "typo.jsonl")
    with pytest.raises(DatasetNotFoundError, match="typo.jsonl"):
        missing.setup("fit")


def test_examples_truncated_to_no_answer_are_dropped_with_a_warning(char_tokenizer, tmp_path, caplog):
    # prompt of "q" alone is 20 tokens + assistant header; the long one exceeds max_length=30
    long_prompt = '{"prompt": "' + "x" * 40 + '", "response": "b"}'
    path = write_jsonl(tmp_path / "t.jsonl", ['{"prompt": "q", "response": "a"}', long_prompt])
    data = InstructionDataModule(char_tokenizer, train_path=path, max_length=30)
    with caplog.at_level(logging.WARNING):
        data.setup("fit")
    assert len(data.encoded["train"]) == 1 and "dropped 1 of 2" in caplog.text
    with pytest.raises(InstructionDataConfigError, match="max_length=5 leaves no answer token"):
        InstructionDataModule(char_tokenizer, train_path=path, max_length=5).setup("fit")


def test_qlora_module_trains_on_the_batches(char_tokenizer, data_files):
    model = make_tiny_llama(len(char_tokenizer))
    data = InstructionDataModule(
        char_tokenizer, train_path=data_files["train"], val_path=data_files["val"], batch_size=4
    )
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        plugins=[NF4Precision(mode="nf4-dq", compute_dtype="fp32", adapter=LoRAConfig(r=4))],
    )
    trainer.fit(QLoRAModule(model, lr=1e-2), datamodule=data)
    assert trainer.global_step == 3
    metrics = trainer.callback_metrics
    assert torch.isfinite(metrics["train/loss"]) and torch.isfinite(metrics["val/loss"])
