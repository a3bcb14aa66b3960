"""``Trainer(accelerator="gpu", plugins=[NF4Precision(mode="nf4-dq")])``: a tiny Llama trains 20 steps in bf16.

Resume must be exact, so the runs use Lightning's ``deterministic="warn"`` (deterministic cuBLAS
workspace and kernels where torch has them) and the math attention kernel (the fused SDPA
backward kernels accumulate with atomics in an order that changes from run to run).
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from lightning_qlora.adapters import LoRAConfig, adapter_layers
from lightning_qlora.plugins import NF4Precision
from lightning_qlora.quantization import Linear4bit
from tests.plugins.test_nf4_precision import TinyLlamaModule, _adapter_weights

from .marks import CUDA_ONLY

pytestmark = CUDA_ONLY


@pytest.fixture(autouse=True)
def _restore_determinism():
    """``deterministic="warn"`` switches torch's deterministic mode on for the whole process; switch it back."""
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    yield
    torch.use_deterministic_algorithms(before[0], warn_only=before[1])


def _fit(module: L.LightningModule, max_steps: int, ckpt_path: str | None = None, **kwargs) -> L.Trainer:
    L.seed_everything(0)
    trainer = L.Trainer(
        accelerator="gpu",
        devices=1,
        max_steps=max_steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic="warn",
        plugins=[NF4Precision(mode="nf4-dq", adapter=LoRAConfig(r=8, alpha=16))],
        **{"enable_checkpointing": False, **kwargs},
    )
    with sdpa_kernel(SDPBackend.MATH):
        trainer.fit(module, ckpt_path=ckpt_path)
    return trainer


class _AutocastRecordingModule(TinyLlamaModule):
    """Records the autocast dtype each training step runs under."""

    def __init__(self) -> None:
        super().__init__()
        self.autocast_dtypes: set[torch.dtype | None] = set()

    def training_step(self, batch, batch_idx):
        enabled = torch.is_autocast_enabled("cuda")
        self.autocast_dtypes.add(torch.get_autocast_dtype("cuda") if enabled else None)
        return super().training_step(batch, batch_idx)


def test_gpu_trainer_fine_tunes_in_bf16_with_the_base_unchanged():
    module = _AutocastRecordingModule()
    snapshot: dict[str, torch.Tensor] = {}

    class Snapshot(L.Callback):
        def on_train_start(self, trainer, pl_module):
            snapshot.update({k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()})

    _fit(module, 20, callbacks=[Snapshot()])
    assert module.autocast_dtypes == {torch.bfloat16}  # mode="nf4-dq", compute_dtype="auto": bf16 on CUDA

    layers = adapter_layers(module)
    assert len(layers) == 14 and all(isinstance(layer.base, Linear4bit) for layer in layers.values())
    assert all(layer.base.weight.packed.is_cuda for layer in layers.values())
    # the first and last five losses (two batches per epoch, so both cover the same data 2.5 times)
    assert sum(module.losses[-5:]) < 0.95 * sum(module.losses[:5]), module.losses
    after = {k: v.detach().cpu() for k, v in module.state_dict().items()}
    changed = {k for k in after if not torch.equal(after[k], snapshot[k])}
    assert changed and all(k.endswith(("lora_A", "lora_B")) for k in changed)  # base bit-identical, embeddings too


def test_gpu_resume_from_step_10_matches_the_uninterrupted_run(tmp_path):
    full = TinyLlamaModule()
    _fit(full, 20)
    first = TinyLlamaModule()
    checkpoints = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_train_steps=10)
    _fit(first, 10, callbacks=[checkpoints], enable_checkpointing=True)
    resumed = TinyLlamaModule()
    _fit(resumed, 20, ckpt_path=checkpoints.last_model_path or str(next(tmp_path.glob("*.ckpt"))))
    expected, actual = _adapter_weights(full), _adapter_weights(resumed)
    assert expected.keys() == actual.keys() and len(expected) == 28
    assert all(torch.equal(expected[k].cpu(), actual[k].cpu()) for k in expected)
    assert resumed.losses == full.losses[10:]
