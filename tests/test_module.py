"""QLoRAModule with NF4Precision: extra losses, Delta-LoRA hook, adapters-only checkpoints and resume."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_qlora.adapters import AdaLoRAConfig, LoRAConfig, adapter_layers
from lightning_qlora.module import QLoRAModule
from lightning_qlora.plugins import NF4Precision

transformers = pytest.importorskip("transformers")


def _module(**kwargs) -> QLoRAModule:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return QLoRAModule(transformers.LlamaForCausalLM(config), lr=1e-2, **kwargs)


def _data() -> DataLoader:
    ids = torch.randint(0, 96, (8, 24), generator=torch.Generator().manual_seed(0))
    return DataLoader([{"input_ids": row} for row in ids], batch_size=4)


def _fit(module: QLoRAModule, steps: int, adapter, tmp_path=None, ckpt_path=None, callbacks=()) -> L.Trainer:
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=any(isinstance(c, L.pytorch.callbacks.ModelCheckpoint) for c in callbacks),
        callbacks=list(callbacks),
        plugins=[NF4Precision(mode="nf4-dq", compute_dtype="fp32", adapter=adapter)],
    )
    L.seed_everything(0)
    trainer.fit(module, train_dataloaders=_data(), ckpt_path=ckpt_path)
    return trainer


def test_adalora_extra_loss_is_added_and_logged():
    module = _module()
    trainer = _fit(module, 6, AdaLoRAConfig(r=4, alpha=8))
    assert "train/extra_loss" in trainer.callback_metrics and trainer.callback_metrics["train/extra_loss"] > 0
    assert len(adapter_layers(module)) == 14


def test_adapters_only_checkpoint_is_small_and_resumes_exactly(tmp_path):
    adapter = LoRAConfig(r=4, alpha=8)
    full = _module()
    _fit(full, 12, adapter)

    first = _module(adapters_only_checkpoints=True)
    checkpoint = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_train_steps=6)
    _fit(first, 6, adapter, callbacks=[checkpoint])
    path = next(tmp_path.glob("*.ckpt"))
    saved = torch.load(path, weights_only=True)["state_dict"]
    assert saved and all(k.endswith(("lora_A", "lora_B")) for k in saved)

    resumed = _module(adapters_only_checkpoints=True)
    _fit(resumed, 12, adapter, ckpt_path=str(path))
    expected, actual = full.state_dict(), resumed.state_dict()
    assert all(torch.equal(expected[k], actual[k]) for k in expected)


def test_the_loss_projects_only_the_tokens_that_have_a_target():
    # An instruction batch has targets on its answer tokens only (12 of ~60 per row in the main job);
    # projecting every position onto the 49k vocabulary was a fifth of a step (issue 20). Rows end
    # their prompts at different positions, so of the positions where some row has a target, a
    # quarter had none in this row (96 targets in 120-128 projected rows): those are left out too.
    module = _module()
    ids = torch.randint(0, 96, (3, 20), generator=torch.Generator().manual_seed(1))
    labels = torch.full_like(ids, -100)
    labels[0, 12:16], labels[1, 5:9], labels[2, 14:20] = ids[0, 12:16], ids[1, 5:9], ids[2, 14:20]
    mask = torch.ones_like(ids)
    mask[2, 18:] = 0
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    rows: list[int] = []
    module.model.lm_head.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[-2]))
    loss = module._loss(batch)
    has_target = labels[:, 1:] != -100  # a position predicts the next token
    positions, targets = int(has_target.any(0).sum()), int(has_target.sum())
    assert rows == [targets] and targets < ids.shape[0] * positions
    reference = module.model(input_ids=ids, attention_mask=mask, labels=labels).loss  # transformers' own loss
    torch.testing.assert_close(loss, reference, rtol=1e-6, atol=1e-6)
    loss.backward()  # and it trains: gradients reach the model
    assert module.model.model.embed_tokens.weight.grad is not None
    unlabelled = module._loss({"input_ids": ids})  # labels default to the inputs: every position
    torch.testing.assert_close(unlabelled, module.model(input_ids=ids, labels=ids).loss, rtol=1e-6, atol=1e-6)


def test_a_prompt_prefix_the_batch_shares_runs_once_with_the_same_loss_and_gradients():
    """Every row starts with the same chat template and instruction: one row of it, its KV cache repeated.

    The prefix's positions predict no target, and causal attention keeps them blind to what
    follows, so the loss and every gradient equal the full batch's (dropout off; with dropout the
    rows share the prefix's mask).
    """
    from lightning_qlora import lm_loss
    from lightning_qlora.qlora import QLoRASpec, apply_qlora

    module = _module()
    apply_qlora(module.model, QLoRASpec(mode="nf4-dq", adapter=LoRAConfig(r=4, alpha=8, dropout=0.0)))
    for name, param in module.model.named_parameters():
        if name.endswith("lora_B"):
            torch.nn.init.normal_(param, std=0.1, generator=torch.Generator().manual_seed(len(name)))
    generator = torch.Generator().manual_seed(2)
    prefix = torch.randint(0, 96, (1, 12), generator=generator)
    ids = torch.cat([prefix.expand(3, -1), torch.randint(0, 96, (3, 9), generator=generator)], 1)
    labels = torch.full_like(ids, -100)
    labels[:, 15:] = ids[:, 15:]
    mask = torch.ones_like(ids)
    mask[1, 19:] = 0  # a right-padded row
    labels[1, 19:] = -100
    fed: list[int] = []
    module.model.model.embed_tokens.register_forward_pre_hook(lambda m, args: fed.append(args[0].numel()))

    def loss_and_grads() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        module.zero_grad(set_to_none=True)
        loss = lm_loss.causal_lm_loss(module.model, ids, mask, labels)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in module.model.named_parameters() if p.grad is not None}

    shared_loss, shared_grads = loss_and_grads()
    assert sum(fed) == 12 + 3 * 9  # the prefix once, then each row's own tokens
    fed.clear()
    reference = module.model(input_ids=ids, attention_mask=mask, labels=labels).loss  # transformers' own loss
    torch.testing.assert_close(shared_loss, reference.detach(), rtol=1e-5, atol=1e-6)
    original = lm_loss.MIN_SHARED_PREFIX
    try:
        lm_loss.MIN_SHARED_PREFIX = 10**9
        full_loss, full_grads = loss_and_grads()
    finally:
        lm_loss.MIN_SHARED_PREFIX = original
    assert sum(fed) == 3 * 21 + 3 * 21  # the reference call above, then the unshared loss
    torch.testing.assert_close(shared_loss, full_loss, rtol=1e-5, atol=1e-6)
    assert shared_grads.keys() == full_grads.keys() and len(shared_grads) > 0
    for name in full_grads:
        torch.testing.assert_close(shared_grads[name], full_grads[name], rtol=1e-4, atol=1e-6)


class _LearningRates(L.Callback):
    def __init__(self) -> None:
        self.seen: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen.append(trainer.optimizers[0].param_groups[0]["lr"])


def test_a_schedule_is_sized_to_the_run_and_stepped_per_optimizer_step():
    """LinearLR without total_iters: the module gives it the run's 6 steps; lr_k = lr * (1 - k / 6)."""
    from functools import partial

    seen = _LearningRates()
    module = _module(scheduler=partial(torch.optim.lr_scheduler.LinearLR, start_factor=1.0, end_factor=0.0))
    _fit(module, 6, LoRAConfig(r=4, alpha=8), callbacks=[seen])
    assert seen.seen == pytest.approx([1e-2 * (1 - k / 6) for k in range(6)])


def test_a_schedule_keeps_the_length_it_is_given_and_resumes_where_it_stopped(tmp_path):
    from functools import partial

    adapter = LoRAConfig(r=4, alpha=8)
    cosine = partial(torch.optim.lr_scheduler.CosineAnnealingLR, T_max=20)
    full = _module(scheduler=cosine)
    _fit(full, 8, adapter)
    first = _module(adapters_only_checkpoints=True, scheduler=cosine)
    checkpoint = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_train_steps=4)
    _fit(first, 4, adapter, callbacks=[checkpoint])
    seen = _LearningRates()
    resumed = _module(adapters_only_checkpoints=True, scheduler=cosine)
    _fit(resumed, 8, adapter, ckpt_path=str(next(tmp_path.glob("*.ckpt"))), callbacks=[seen])
    assert seen.seen == pytest.approx([1e-2 * (1 + math.cos(math.pi * k / 20)) / 2 for k in range(4, 8)])
    expected, actual = full.state_dict(), resumed.state_dict()
    assert all(torch.equal(expected[k], actual[k]) for k in expected)


def test_a_schedule_without_a_run_length_is_refused_with_the_fix():
    from functools import partial

    module = _module(scheduler=partial(torch.optim.lr_scheduler.LinearLR, start_factor=1.0, end_factor=0.0))
    trainer = L.Trainer(accelerator="cpu", max_epochs=-1, max_steps=-1, logger=False, enable_progress_bar=False)
    module.trainer = trainer
    NF4Precision(adapter=LoRAConfig(r=4)).convert_module(module)
    with pytest.raises(ValueError, match="trainer.max_steps"):
        module.configure_optimizers()
