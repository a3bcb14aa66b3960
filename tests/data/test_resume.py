"""Exact mid-epoch resume with a plain ``lightning.Trainer`` on ``InstructionDataModule``.

The oracle is the same training run done in one go: stopping at any step (mid-epoch, or just
after an epoch boundary) and resuming from ``last.ckpt`` must give bit-identical adapters.
"""

from __future__ import annotations

import warnings

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_qlora.adapters import LoRAConfig
from lightning_qlora.data import InstructionDataModule, RandomStateCheckpoint, ResumableDataLoader
from lightning_qlora.data.resume import SeededShuffleSampler
from lightning_qlora.module import QLoRAModule
from lightning_qlora.plugins import NF4Precision

from .helpers import make_tiny_llama, write_jsonl

# 40 examples, batch 4: 10 batches per epoch
RECORDS = [f'{{"prompt": "q{i}{"x" * (i % 7)}", "response": "a{i}"}}' for i in range(40)]


def _train(tokenizer, paths, run_dir, max_steps: int, ckpt_path: str | None, dropout: float):
    model = make_tiny_llama(len(tokenizer))
    data = InstructionDataModule(tokenizer, train_path=paths["train"], val_path=paths["val"], batch_size=4, seed=3)
    callbacks = [ModelCheckpoint(dirpath=run_dir, save_last=True, save_top_k=0, every_n_train_steps=1)]
    if dropout:  # the adapters' dropout draws from the global RNG: its state must travel in the checkpoint
        callbacks.append(RandomStateCheckpoint())
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        logger=False,
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        val_check_interval=3,
        limit_val_batches=1,
        plugins=[NF4Precision(mode="nf4-dq", compute_dtype="fp32", adapter=LoRAConfig(r=4, dropout=dropout))],
    )
    module = QLoRAModule(model, lr=1e-2, adapters_only_checkpoints=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    assert trainer.global_step == max_steps
    adapters = {name: p.detach().clone() for name, p in module.named_parameters() if p.requires_grad}
    return adapters, [str(w.message) for w in caught]


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_stop_anywhere_and_resume_equals_one_run(char_tokenizer, tmp_path, dropout):
    paths = {split: write_jsonl(tmp_path / f"{split}.jsonl", RECORDS) for split in ("train", "val")}
    L.seed_everything(0)
    straight, _ = _train(char_tokenizer, paths, tmp_path / "straight", 13, None, dropout)

    L.seed_everything(0)
    _train(char_tokenizer, paths, tmp_path / "parts", 4, None, dropout)  # stops mid-epoch 0
    last = str(tmp_path / "parts" / "last.ckpt")
    L.seed_everything(0)
    _, messages = _train(char_tokenizer, paths, tmp_path / "parts", 11, last, dropout)  # into epoch 1
    assert not [m for m in messages if "not resumable" in m], messages
    L.seed_everything(0)
    resumed, _ = _train(char_tokenizer, paths, tmp_path / "parts", 13, last, dropout)  # resumed mid-epoch 1

    assert straight.keys() == resumed.keys() and straight
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name


def test_order_is_a_function_of_seed_and_epoch():
    def order(seed: int, epoch: int) -> list[int]:
        sampler = SeededShuffleSampler(10, seed=seed)
        sampler.set_epoch(epoch)
        return list(sampler)

    assert order(0, 0) == order(0, 0) and sorted(order(0, 0)) == list(range(10))
    assert order(0, 0) != order(0, 1) and order(0, 0) != order(1, 0)
    # the reference: torch.randperm under a generator seeded with seed + epoch (as DistributedSampler)
    assert order(2, 5) == torch.randperm(10, generator=torch.Generator().manual_seed(7)).tolist()


def test_loader_state_resumes_its_position_in_plain_pytorch():
    def loader() -> ResumableDataLoader:
        return ResumableDataLoader(list(range(10)), batch_size=3, sampler=SeededShuffleSampler(10, seed=1))

    straight = loader()
    epochs = [[b.tolist() for b in straight] for _ in range(2)]  # a plain loop advances the epoch itself
    assert epochs[0] != epochs[1]

    first = loader()
    iterator = iter(first)
    seen = [next(iterator).tolist(), next(iterator).tolist()]
    state = first.state_dict()
    assert state == {"epoch": 0, "batches": 2}
    second = loader()
    second.load_state_dict(state)
    assert seen + [b.tolist() for b in second] == epochs[0]
    assert [b.tolist() for b in second] == epochs[1]


def test_epoch_end_state_points_at_the_next_epoch():
    loader = ResumableDataLoader(list(range(6)), batch_size=3, sampler=SeededShuffleSampler(6, seed=0))
    iterator = iter(loader)
    next(iterator), next(iterator)  # every batch handed out; the pass has not been closed by StopIteration
    assert loader.state_dict() == {"epoch": 1, "batches": 0}
    again = ResumableDataLoader(list(range(6)), batch_size=3, sampler=SeededShuffleSampler(6, seed=0))
    again.load_state_dict({"epoch": 0, "batches": 2})  # as written by a loader that never got StopIteration
    assert again.epoch == 1 and len(list(again)) == 2


def test_bad_loader_state_is_a_typed_error():
    from lightning_qlora.data import InstructionDataConfigError

    loader = ResumableDataLoader(list(range(6)), batch_size=3, sampler=SeededShuffleSampler(6, seed=0))
    with pytest.raises(InstructionDataConfigError, match="batches=7"):
        loader.load_state_dict({"epoch": 0, "batches": 7})
