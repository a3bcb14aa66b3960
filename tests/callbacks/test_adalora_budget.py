"""AdaLoRABudget: the closed-form schedule, global pruning on a real (tiny) Llama, resume."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch

from lightning_qlora.adapters import AdaLoRAConfig, AdaLoRALayer, LoRAConfig, adapter_layers
from lightning_qlora.callbacks import AdaLoRABudget, CallbackConfigError, budget_schedule
from lightning_qlora.plugins import NF4Precision
from tests.callbacks.tiny import TinyLlamaQLoRA, adapter_tensors, trainer

pytest.importorskip("transformers")


def _closed_form(t: int, b0: int, bt: int, ti: int, tf: int, total: int) -> int:
    if t < ti:
        return b0
    if t >= total - tf:
        return bt
    return int(bt + (b0 - bt) * (1 - (t - ti) / (total - ti - tf)) ** 3)


@pytest.mark.parametrize(("ti", "tf", "total"), [(0, 0, 10), (5, 5, 30), (100, 300, 1000), (1, 0, 2), (7, 11, 19)])
def test_schedule_is_the_closed_form_at_every_step(ti, tf, total):
    for t in range(total + 3):
        assert budget_schedule(t, 144, 48, ti, tf, total) == _closed_form(t, 144, 48, ti, tf, total)


def test_schedule_hand_computed_points():
    # b0 = 100, b_T = 20, t_i = 10, t_f = 10, T = 50: the cubic runs over 30 steps
    assert budget_schedule(9, 100, 20, 10, 10, 50) == 100
    assert budget_schedule(10, 100, 20, 10, 10, 50) == 100  # (1 - 0)^3
    assert budget_schedule(25, 100, 20, 10, 10, 50) == 30  # 20 + 80 * 0.5^3 = 30
    assert budget_schedule(37, 100, 20, 10, 10, 50) == 20  # 20 + 80 * 0.1^3 = 20.08 -> 20
    assert budget_schedule(40, 100, 20, 10, 10, 50) == 20


def _fit(
    max_steps: int = 30, ckpt_path: str | None = None, mask_interval: int = 3, **trainer_kwargs
) -> tuple[TinyLlamaQLoRA, AdaLoRABudget]:
    module = TinyLlamaQLoRA()
    budget = AdaLoRABudget(
        target_rank=2, init_warmup=5, final_warmup=5, mask_interval=mask_interval, total_steps=30, plot=False
    )
    L.seed_everything(0)
    plugin = NF4Precision(mode="nf4-dq", compute_dtype="fp32", adapter=AdaLoRAConfig(r=6, alpha=12))
    callbacks = [budget, *trainer_kwargs.pop("callbacks", [])]
    trainer(max_steps=max_steps, plugins=[plugin], callbacks=callbacks, **trainer_kwargs).fit(
        module, ckpt_path=ckpt_path
    )
    return module, budget


@pytest.mark.parametrize(
    ("mask_interval", "expected_steps"), [(3, [6, 9, 12, 15, 18, 21, 24, 25]), (4, [8, 12, 16, 20, 24, 25])]
)
def test_budget_is_met_after_every_masking_step_and_ranks_differ(tmp_path, mask_interval, expected_steps):
    module, budget = _fit(default_root_dir=tmp_path, mask_interval=mask_interval)
    layers = {n: l for n, l in adapter_layers(module).items() if isinstance(l, AdaLoRALayer)}
    assert len(layers) == 14 and budget.initial_budget == 84 and budget.target_budget == 28
    steps = [step for step, _, _ in budget.history]
    # issue 13 point 10: the reference grid, t % delta_T == 0 in [t_i, T - t_f), then once at T - t_f
    # (masking every delta_T steps counted from t_i gave [5, 9, 13, ...]: after step 8 with delta_T=4 the kept
    # rank was b(5) = 84 instead of b(8) = 62)
    assert steps == expected_steps
    assert budget.history[0][2] == _closed_form(expected_steps[0], 84, 28, 5, 5, 30)
    for step, scheduled, kept in budget.history:
        assert scheduled == _closed_form(step, 84, 28, 5, 5, 30) == kept
    ranks = [layer.rank for layer in layers.values()]
    assert sum(ranks) == 28
    assert len(set(ranks)) > 1  # the allocation is not uniform
    assert all(torch.count_nonzero(l.lora_E * (1 - l.rank_mask)) == 0 for l in layers.values())
    assert module.losses[-1] < module.losses[0]


def test_rank_heatmap_and_pattern_are_written(tmp_path):
    module = TinyLlamaQLoRA()
    plugin = NF4Precision(mode="nf4", compute_dtype="fp32", adapter=AdaLoRAConfig(r=4))
    callback = AdaLoRABudget(target_budget=20, mask_interval=2, total_steps=8)
    logger = L.pytorch.loggers.CSVLogger(tmp_path)
    trainer(max_steps=8, plugins=[plugin], callbacks=[callback], logger=logger).fit(module)
    pattern = json.loads((tmp_path / "lightning_logs/version_0/adalora_ranks.json").read_text())
    assert sum(pattern.values()) == 20 and len(pattern) == 14
    png = (tmp_path / "lightning_logs/version_0/adalora_ranks.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    metrics = (tmp_path / "lightning_logs/version_0/metrics.csv").read_text()
    assert "adalora/budget" in metrics and "adalora/rank/model.model.layers.0.self_attn.q_proj" in metrics


def test_resume_mid_schedule_matches_the_uninterrupted_run(tmp_path):
    full, full_budget = _fit()
    checkpoint = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_train_steps=12)
    _fit(max_steps=12, callbacks=[checkpoint], enable_checkpointing=True)
    resumed, resumed_budget = _fit(ckpt_path=str(next(tmp_path.glob("*step=12*.ckpt"))))
    assert resumed_budget.ranks() == full_budget.ranks()
    assert resumed_budget.history == full_budget.history
    expected, actual = adapter_tensors(full), adapter_tensors(resumed)
    assert expected.keys() == actual.keys() and len(expected) == 14 * 4
    assert all(torch.equal(expected[k], actual[k]) for k in expected)


def test_importance_comes_from_accumulated_gradients_once_per_step(monkeypatch):
    calls: list[int] = []
    original = AdaLoRALayer.update_importance

    def counting(self, beta1=0.85, beta2=0.85):
        calls.append(id(self))
        return original(self, beta1, beta2)

    monkeypatch.setattr(AdaLoRALayer, "update_importance", counting)
    module = TinyLlamaQLoRA()
    callback = AdaLoRABudget(target_rank=2, mask_interval=2, total_steps=6, plot=False)
    plugin = NF4Precision(mode="nf4", compute_dtype="fp32", adapter=AdaLoRAConfig(r=4))
    trainer(max_steps=6, accumulate_grad_batches=2, plugins=[plugin], callbacks=[callback]).fit(module)
    assert len(module.losses) == 12 and len(calls) == 6 * 14  # 12 micro-batches, 6 optimizer steps
    assert [s for s, _, _ in callback.history] == [2, 4, 6]


def test_misconfiguration_fails_at_construction_or_fit_start():
    with pytest.raises(CallbackConfigError, match="exactly one of target_rank"):
        AdaLoRABudget()
    with pytest.raises(CallbackConfigError, match="mask_interval=0"):
        AdaLoRABudget(target_rank=4, mask_interval=0)
    with pytest.raises(CallbackConfigError, match="beta1=1.5"):
        AdaLoRABudget(target_rank=4, beta1=1.5)
    cases = [
        (AdaLoRAConfig(r=4), AdaLoRABudget(target_rank=8, total_steps=10), "target budget 112 must be in \\[1, 56\\]"),
        (
            AdaLoRAConfig(r=4),
            AdaLoRABudget(target_rank=2, init_warmup=5, final_warmup=5, total_steps=10),
            "init_warmup \\+ final_warmup = 5 \\+ 5 must be below total_steps=10",
        ),
        (
            LoRAConfig(r=4),
            AdaLoRABudget(target_rank=2, total_steps=10),
            "needs AdaLoRA adapters, the model has \\['lora'\\]",
        ),
    ]
    for adapter, callback, message in cases:
        module = TinyLlamaQLoRA()
        plugin = NF4Precision(mode="nf4", compute_dtype="fp32", adapter=adapter)
        with pytest.raises(CallbackConfigError, match=message):
            trainer(max_steps=10, plugins=[plugin], callbacks=[callback]).fit(module)
        assert module.losses == []  # failed before the first step
