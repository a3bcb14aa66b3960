"""The per-step thread choice (``lightning_qlora.threads.StepThreads``, ``NF4Precision(adaptive_threads=True)``).

The policy is driven with given step times (what the 2-core VM measured for the main job's steps:
2 threads 2.0 s and 1 thread 2.7 s idle; beside two busy processes 13.3 s and 3.9 s with OpenMP's
default spinning), so every expectation is a hand count, not a timing.
"""

from __future__ import annotations

from collections.abc import Callable

import lightning as L
import pytest
import torch
from torch import nn

from lightning_qlora.errors import ConfigError
from lightning_qlora.plugins import NF4Precision
from lightning_qlora.threads import StepThreads

IDLE = {2: 2.0, 1: 2.7}
BUSY = {2: 13.3, 1: 3.9}


def simulate(chooser: StepThreads, seconds: Callable[[int, int], float], steps: int) -> list[int]:
    """Thread counts of ``steps`` steps when a step of ``threads`` threads at index ``i`` takes ``seconds(i, threads)``."""
    counts = []
    for i in range(steps):
        threads = chooser.pick()
        chooser.record(threads, seconds(i, threads))
        counts.append(threads)
    return counts


def test_an_idle_machine_keeps_the_team_and_probes_one_thread_ever_less_often():
    counts = simulate(StepThreads(threads=2), lambda i, t: IDLE[t], 100)
    assert counts[:4] == [2, 1, 2, 1]  # both measured twice, alternating
    ones = [i for i, t in enumerate(counts) if t == 1 and i >= 4]
    assert ones[0] == 7  # the first probe 4 steps after the choice
    assert [b - a for a, b in zip(ones, ones[1:])] == [4, 8, 16, 32, 32]  # losing probes back off to 32 steps
    assert counts.count(2) == 100 - 2 - len(ones)


def test_beside_busy_processes_one_thread_runs():
    counts = simulate(StepThreads(threads=2), lambda i, t: BUSY[t], 60)
    assert counts[:4] == [2, 1, 2, 1] and counts[4:].count(2) <= 4  # only the backing-off probes


def test_the_choice_follows_contention_both_ways_within_a_few_steps():
    def seconds(i: int, threads: int) -> float:
        return (BUSY if 40 <= i < 80 else IDLE)[threads]

    counts = simulate(StepThreads(threads=2), seconds, 120)
    assert counts[30:40].count(2) >= 8  # idle: the team, but for probes
    # busy from step 40: two slow team steps say the machine changed, both are measured again (4 steps),
    # then one thread but for the probes (at most 4 in 32 steps: every 4, 8, 16 ...); likewise back
    assert counts[48:80].count(1) >= 28
    assert counts[88:120].count(2) >= 28


def test_one_preempted_step_does_not_change_the_choice():
    counts = simulate(StepThreads(threads=2), lambda i, t: 20.0 if i == 20 else IDLE[t], 40)
    assert counts[21:40].count(1) <= 2  # a probe or two, no switch


def test_a_team_that_is_barely_faster_is_not_worth_it():
    counts = simulate(StepThreads(threads=2), lambda i, t: {2: 1.97, 1: 2.0}[t], 40)
    assert counts[4:].count(1) == 32  # 1.5% faster is under the 5% margin: one thread but for 4 probes (steps 7, 11, 19, 35)


def test_one_thread_or_deterministic_algorithms_leave_the_count_alone():
    assert set(simulate(StepThreads(threads=1), lambda i, t: IDLE[t], 10)) == {1}
    torch.use_deterministic_algorithms(True)
    try:
        assert set(simulate(StepThreads(threads=2), lambda i, t: BUSY[t], 10)) == {2}
    finally:
        torch.use_deterministic_algorithms(False)


@pytest.mark.parametrize("threads", [0, -2, 1.5, True, "2"])
def test_a_bad_team_size_is_refused(threads):
    with pytest.raises(ConfigError, match="threads="):
        StepThreads(threads=threads)


def test_a_step_runs_on_the_chosen_count_and_restores_the_previous_one():
    previous = torch.get_num_threads()
    chooser = StepThreads(threads=2)
    seen = []
    for _ in range(2):  # the first two steps measure the team, then one thread
        with chooser.step() as threads:
            seen.append((threads, torch.get_num_threads()))
        assert torch.get_num_threads() == previous
    assert seen == [(2, 2), (1, 1)]
    with pytest.raises(RuntimeError, match="boom"), chooser.step():
        raise RuntimeError("boom")
    assert torch.get_num_threads() == previous and chooser.history == [2, 1]  # a failed step is not recorded


class _Tiny(L.LightningModule):
    """A plain LightningModule: two Linear layers, regression on fixed data."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
        self.threads_seen: list[int] = []

    def training_step(self, batch, batch_idx):
        self.threads_seen.append(torch.get_num_threads())
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def _fit(plugin: NF4Precision, steps: int, strategy: object = "auto") -> _Tiny:
    generator = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(steps * 4, 64, generator=generator), torch.randn(steps * 4, 8))
    model = _Tiny()
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        strategy=strategy,
        plugins=[plugin],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, torch.utils.data.DataLoader(data, batch_size=4))
    return model


def test_the_trainer_runs_every_step_through_the_choice_and_gives_the_threads_back(restore_torch_threads):
    torch.set_num_threads(2)
    plugin = NF4Precision(adaptive_threads=True)
    model = _fit(plugin, 6)
    assert torch.get_num_threads() == 2  # the user's count after fit
    assert plugin.step_threads is not None and plugin.step_threads.history == model.threads_seen
    assert model.threads_seen[:4] == [2, 1, 2, 1]  # the training step itself ran on the chosen count


def test_fsdp_runs_every_step_through_the_choice_as_the_plain_plugin_does(restore_torch_threads):
    from lightning_qlora.plugins import FSDPNF4Precision
    from lightning_qlora.strategies import QLoRAFSDPStrategy

    torch.set_num_threads(2)
    plugin = FSDPNF4Precision(compute_dtype="fp32", adaptive_threads=True)
    model = _fit(plugin, 6, strategy=QLoRAFSDPStrategy())
    assert torch.get_num_threads() == 2
    assert plugin.qlora.step_threads.history == model.threads_seen
    assert model.threads_seen[:4] == [2, 1, 2, 1]


def test_without_adaptive_threads_the_count_is_the_users(restore_torch_threads):
    torch.set_num_threads(2)
    plugin = NF4Precision()
    model = _fit(plugin, 4)
    assert plugin.step_threads is None and model.threads_seen == [2, 2, 2, 2]


def test_a_bad_adaptive_threads_value_is_refused():
    with pytest.raises(ConfigError, match="adaptive_threads='yes'"):
        NF4Precision(adaptive_threads="yes")


def test_a_fabric_loop_runs_its_step_through_the_precision_choice(restore_torch_threads):
    from lightning_qlora.plugins import FabricNF4Precision

    torch.set_num_threads(2)
    precision = FabricNF4Precision(compute_dtype="fp32", adaptive_threads=True)
    fabric = L.Fabric(accelerator="cpu", devices=1, plugins=[precision])
    L.seed_everything(0)
    model = fabric.setup_module(nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64)))
    optimizer = fabric.setup_optimizers(
        torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    )
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(0))
    seen = []
    for _ in range(4):
        with precision.step_threads.step():  # the user's whole step: forward, backward, update
            seen.append(torch.get_num_threads())
            fabric.backward(model(x).square().mean())
            optimizer.step()
            optimizer.zero_grad()
    assert seen == precision.step_threads.history == [2, 1, 2, 1]
    assert torch.get_num_threads() == 2
