"""``compute_dtype="auto"`` picks what a measurement finds faster, not what the CPU flags suggest (issue 20)."""

from __future__ import annotations

import contextlib
import importlib

import pytest
import torch

from lightning_qlora.plugins import FabricNF4Precision, FSDPNF4Precision, NF4Precision
from lightning_qlora.qlora import QLoRAConfigError

# imported lazily so that, run against the code before issue 20, the tests fail on what `auto` picks
with contextlib.suppress(ImportError):
    compute_dtype_module = importlib.import_module("lightning_qlora.plugins.compute_dtype")


@pytest.fixture(autouse=True)
def _fresh_measurements():
    if "compute_dtype_module" in globals():
        compute_dtype_module.forget_measurements()
    yield
    if "compute_dtype_module" in globals():
        compute_dtype_module.forget_measurements()


def _fake_timings(monkeypatch, fp32: float, bf16: float) -> list[torch.dtype]:
    """Make every measurement return these seconds; returns the list of dtypes measured."""
    calls: list[torch.dtype] = []

    def measure(dtype: torch.dtype) -> float:
        calls.append(dtype)
        return {torch.float32: fp32, torch.bfloat16: bf16}[dtype]

    if "compute_dtype_module" in globals():
        monkeypatch.setattr(compute_dtype_module, "time_qlora_layer_step", measure)
    return calls


@pytest.mark.parametrize("plugin_class", [FabricNF4Precision, NF4Precision])
def test_auto_picks_fp32_when_bf16_measures_slower_even_if_the_cpu_reports_bf16(monkeypatch, plugin_class):
    # the machine this is built on: avx512_bf16 in /proc/cpuinfo, bf16 matmuls slower than fp32
    monkeypatch.setattr("lightning_qlora.qlora.cpu_has_fast_bf16", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _fake_timings(monkeypatch, fp32=0.010, bf16=0.030)
    plugin = plugin_class(compute_dtype="auto")
    assert plugin.compute_dtype == torch.float32
    assert isinstance(plugin.forward_context(), contextlib.nullcontext)  # no autocast at all


def test_auto_picks_bf16_only_when_it_is_clearly_faster(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _fake_timings(monkeypatch, fp32=0.010, bf16=0.004)
    assert FabricNF4Precision(compute_dtype="auto").compute_dtype == torch.bfloat16
    compute_dtype_module.forget_measurements()
    _fake_timings(monkeypatch, fp32=0.010, bf16=0.0095)  # within the margin: not worth bf16's precision loss
    assert FabricNF4Precision(compute_dtype="auto").compute_dtype == torch.float32


def test_measurement_runs_once_per_process_and_thread_count(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    calls = _fake_timings(monkeypatch, fp32=0.010, bf16=0.030)
    for _ in range(3):
        FabricNF4Precision(compute_dtype="auto")
    assert calls == [torch.float32, torch.bfloat16] * (compute_dtype_module.ROUNDS + 1)  # warm-up, then interleaved
    report = compute_dtype_module.measured_compute_dtypes()
    assert report == {
        f"cpu/{torch.get_num_threads()} threads": {"fp32_s": 0.010, "bf16_s": 0.030, "chosen": "torch.float32"}
    }


def test_explicit_dtypes_and_cuda_are_not_measured(monkeypatch):
    calls = _fake_timings(monkeypatch, fp32=0.010, bf16=0.001)
    assert compute_dtype_module.choose_compute_dtype("fp32") == torch.float32
    assert compute_dtype_module.choose_compute_dtype("bf16", "cpu") == torch.bfloat16
    assert compute_dtype_module.choose_compute_dtype(torch.float16) == torch.float16
    assert compute_dtype_module.choose_compute_dtype("auto", "cuda") == torch.bfloat16
    assert calls == []
    with pytest.raises(QLoRAConfigError, match="compute_dtype='fp8'"):
        compute_dtype_module.choose_compute_dtype("fp8")


def test_fsdp_plugin_takes_the_measured_dtype(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _fake_timings(monkeypatch, fp32=0.010, bf16=0.030)
    plugin = FSDPNF4Precision(compute_dtype="auto")
    assert plugin.qlora.compute_dtype == torch.float32
    assert plugin.precision == "32-true"


def test_the_real_measurement_times_both_dtypes():
    # no timing assert (the machine is shared): both runs happen and give positive, finite seconds
    for dtype in (torch.float32, torch.bfloat16):
        seconds = compute_dtype_module.time_qlora_layer_step(dtype)
        assert 0.0 < seconds < 60.0
    assert compute_dtype_module.choose_compute_dtype("auto", "cpu") in (torch.float32, torch.bfloat16)


def test_the_measurement_leaves_the_seeded_random_stream_as_it_was(monkeypatch):
    # the probe layer's LoRA init and its dropout masks drew from torch's global generator, so a
    # seeded run's adapters and dropout differed between compute_dtype="auto" and "fp32", and
    # between the first and a later run in one process (a Hydra -m sweep), where the choice is cached
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    torch.manual_seed(1234)
    expected = torch.rand(8)
    torch.manual_seed(1234)
    plugin = FabricNF4Precision(compute_dtype="auto")  # the real measurement (nothing faked)
    assert compute_dtype_module.measured_compute_dtypes()  # it did measure
    assert plugin.compute_dtype in (torch.float32, torch.bfloat16)
    assert torch.equal(torch.rand(8), expected)


def test_a_resumed_auto_run_computes_in_the_dtype_its_checkpoint_was_trained_in(monkeypatch, tmp_path):
    # Two processes can measure the other way round; resuming must not switch dtype mid-run.
    import lightning as L

    from tests.plugins.test_plain_module import UserModule

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    def fit(plugin: NF4Precision, max_steps: int, ckpt_path: str | None = None) -> None:
        checkpoints = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_train_steps=2)
        trainer = L.Trainer(
            accelerator="cpu",
            devices=1,
            max_steps=max_steps,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            plugins=[plugin],
            callbacks=[checkpoints],
        )
        trainer.fit(UserModule(), ckpt_path=ckpt_path)

    _fake_timings(monkeypatch, fp32=0.010, bf16=0.004)
    first = NF4Precision(compute_dtype="auto")
    assert first.compute_dtype == torch.bfloat16
    fit(first, 2)
    checkpoint = str(next(tmp_path.glob("*step=2*.ckpt")))

    compute_dtype_module.forget_measurements()
    _fake_timings(monkeypatch, fp32=0.010, bf16=0.030)  # this process would pick fp32 by itself
    resumed = NF4Precision(compute_dtype="auto")
    assert resumed.compute_dtype == torch.float32
    fit(resumed, 3, ckpt_path=checkpoint)
    assert resumed.compute_dtype == torch.bfloat16

    explicit = NF4Precision(compute_dtype="fp32")  # an explicit dtype is the user's choice and stays
    explicit.load_state_dict(first.state_dict())
    assert explicit.compute_dtype == torch.float32
