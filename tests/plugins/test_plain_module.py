"""NF4Precision as a drop-in for a user's own LightningModule (and Fabric loop), with every adapter method.

Nothing here imports ``lightning_qlora.module``: the modules are what a Lightning user writes
(model built in ``__init__`` or in ``configure_model``, AdamW over the trainable parameters, no
hook of ours), and the plugin alone must make training, per-step work, extra losses and resume
behave as they would with a float model (issue 13, points 1 and 2).
"""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_qlora.adapters import (
    AdaLoRAConfig,
    DeltaLoRAConfig,
    DoRAConfig,
    LoRAConfig,
    LoRADropConfig,
    LoRAFAConfig,
    LoRAPlusConfig,
    MixtureLoRAConfig,
    VeRAConfig,
    adapter_layers,
)
from lightning_qlora.callbacks import AdaLoRABudget, LoRADrop
from lightning_qlora.plugins import FabricNF4Precision, NF4Precision

transformers = pytest.importorskip("transformers")

METHODS = {
    "lora": LoRAConfig(r=4, alpha=8),
    "lora_plus": LoRAPlusConfig(r=4, alpha=8, lr_ratio=4),
    "lora_fa": LoRAFAConfig(r=4, alpha=8),
    "lora_drop": LoRADropConfig(r=4, alpha=8),
    "dora": DoRAConfig(r=4, alpha=8),
    "vera": VeRAConfig(r=8),
    "adalora": AdaLoRAConfig(r=4, alpha=8),
    "delta_lora": DeltaLoRAConfig(r=4, alpha=8, fold_every=2),
    "moe_lora": MixtureLoRAConfig(r=2, alpha=4, num_experts=2, top_k=1, load_balance_weight=0.1),
}
# the methods whose schedule lives in a callback bring it, so resume covers its state too
CALLBACKS = {
    "lora_drop": lambda: [LoRADrop(stage1_steps=4, top_n=3, plot=False)],
    "adalora": lambda: [
        AdaLoRABudget(target_rank=2, init_warmup=2, final_warmup=2, mask_interval=2, total_steps=12, plot=False)
    ],
}
TOTAL, RESUME_AT = 12, 8  # 4 batches per epoch: the checkpoint falls on an epoch boundary


def tiny_llama() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return transformers.LlamaForCausalLM(config)


class UserModule(L.LightningModule):
    """What a Lightning user writes: their model, their loss, their optimizer. No lightning_qlora import."""

    def __init__(self) -> None:
        super().__init__()
        self.model = tiny_llama()
        self.losses: list[float] = []

    def training_step(self, batch, batch_idx):
        (ids,) = batch
        loss = self.model(input_ids=ids, labels=ids).loss
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-2)

    def train_dataloader(self):
        ids = torch.randint(0, 96, (16, 16), generator=torch.Generator().manual_seed(0))
        return DataLoader(TensorDataset(ids), batch_size=4)


class ConfigureModelModule(UserModule):
    """The same, with the model built in ``configure_model`` (converted at construction by the plugin)."""

    def __init__(self) -> None:
        L.LightningModule.__init__(self)
        self.model: torch.nn.Module | None = None
        self.losses = []

    def configure_model(self) -> None:
        if self.model is None:
            self.model = tiny_llama()


def _fit(
    module: L.LightningModule,
    method: str,
    max_steps: int,
    ckpt_path: str | None = None,
    callbacks: list | None = None,
    compute_dtype: str = "fp32",
    **trainer_kwargs: object,
) -> L.LightningModule:
    L.seed_everything(0)
    plugin = NF4Precision(mode="nf4-dq", compute_dtype=compute_dtype, adapter=METHODS[method])
    extra = CALLBACKS.get(method, list)()
    checkpointing = any(isinstance(c, L.pytorch.callbacks.ModelCheckpoint) for c in callbacks or [])
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=checkpointing,
        plugins=[plugin],
        callbacks=[*extra, *(callbacks or [])],
        **trainer_kwargs,
    )
    trainer.fit(module, ckpt_path=ckpt_path)
    return module


def _state(module: L.LightningModule) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items() if isinstance(v, torch.Tensor)}


def _resume_matches(tmp_path, method: str, module_class: type[L.LightningModule]) -> tuple[L.LightningModule, dict]:
    full = _fit(module_class(), method, TOTAL)
    checkpoints = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_train_steps=RESUME_AT)
    _fit(module_class(), method, RESUME_AT, callbacks=[checkpoints])
    path = str(next(tmp_path.glob(f"*step={RESUME_AT}*.ckpt")))
    resumed = _fit(module_class(), method, TOTAL, ckpt_path=path)
    expected, actual = _state(full), _state(resumed)
    assert expected.keys() == actual.keys()
    different = [k for k in expected if not torch.equal(expected[k], actual[k])]
    assert not different, different[:5]
    return full, expected


@pytest.mark.slow
@pytest.mark.parametrize("method", list(METHODS))
def test_plain_module_trains_and_resumes_bit_identically(tmp_path, method):
    # issue 13 point 1: on 5057988 the resume died in load_state_dict with "Unexpected key(s)"
    full, state = _resume_matches(tmp_path, method, UserModule)
    assert sum(full.losses[-3:]) < sum(full.losses[:3]), full.losses
    layers = adapter_layers(full)
    assert len(layers) == 14 and all(layer.config == METHODS[method] for layer in layers.values())
    if method == "delta_lora":  # the moved base is part of what resumed bit for bit
        assert any(".base.weight" in key for key in state)


def test_configure_model_is_quantized_at_construction_and_resumes(tmp_path):
    full, _ = _resume_matches(tmp_path, "lora", ConfigureModelModule)
    assert len(adapter_layers(full)) == 14


def test_resume_from_an_epoch_boundary_of_a_model_built_in_init_needs_no_hook(tmp_path):
    # the checkpoint a plain module writes loads into a float module as it is (Lightning restores
    # weights before the plugin converts), and a float model loaded from it without the plugin is NaN, not silent
    checkpoints = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_train_steps=4)
    _fit(UserModule(), "lora", 4, callbacks=[checkpoints])
    checkpoint = torch.load(next(tmp_path.glob("*.ckpt")), weights_only=True)
    float_keys = set(UserModule().state_dict())
    assert set(checkpoint["state_dict"]) == float_keys
    assert torch.isnan(checkpoint["state_dict"]["model.model.layers.0.self_attn.q_proj.weight"]).all()
    assert checkpoint["lightning_qlora"]["spec"]["adapter"]["method"] == "lora"


class _CaptureGrads(L.Callback):
    def __init__(self) -> None:
        self.grads: dict[str, torch.Tensor] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if not self.grads:
            self.grads = {n: p.grad.clone() for n, p in pl_module.named_parameters() if p.grad is not None}


class ZeroTaskLoss(UserModule):
    """A loss with no gradient of its own: every gradient must come from the adapters' extra loss."""

    def training_step(self, batch, batch_idx):
        (ids,) = batch
        return 0.0 * self.model(input_ids=ids).logits.sum()


@pytest.mark.parametrize(("method", "parameter"), [("adalora", "lora_A"), ("moe_lora", "router")])
def test_extra_loss_is_in_the_backpropagated_loss(method, parameter):
    # issue 13 point 2: on 5057988 only QLoRAModule added extra_loss(); a user's module got no regularizer
    capture = _CaptureGrads()
    module = UserModule()
    module.training_step = ZeroTaskLoss.training_step.__get__(module)
    snapshot: dict[str, torch.nn.Module] = {}

    class Before(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if not snapshot:
                snapshot["model"] = copy.deepcopy(pl_module.model)

    _fit(module, method, 1, callbacks=[Before(), capture])
    reference = snapshot["model"]
    layers = adapter_layers(reference)
    (ids,) = next(iter(module.train_dataloader()))
    reference(input_ids=ids)  # the mixture's balance term comes from the forward
    expected = torch.stack([layer.extra_loss() for layer in layers.values()]).sum()
    name = "model.layers.0.self_attn.q_proj"
    grad = torch.autograd.grad(expected, getattr(layers[name], parameter))[0]
    torch.testing.assert_close(capture.grads[f"model.{name}.{parameter}"], grad, rtol=1e-5, atol=1e-8)
    assert grad.abs().sum() > 0


def test_delta_lora_moves_the_float_base_by_the_adapter_change():
    # issue 13 point 2: on 5057988 Delta-LoRA trained as plain LoRA outside QLoRAModule (base never moved)
    config = DeltaLoRAConfig(r=4, alpha=8, delta_scale=2.0)
    module = UserModule()
    initial = {k: v.clone() for k, v in module.model.state_dict().items()}
    L.seed_everything(0)
    L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=5,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        plugins=[NF4Precision(mode="none", compute_dtype="fp32", adapter=config)],
    ).fit(module)
    for name, layer in adapter_layers(module.model).items():
        # telescoped Delta-LoRA updates: W_T = W_0 + lambda * s * (B_T A_T - B_0 A_0), with B_0 = 0
        expected = initial[f"{name}.weight"] + 2.0 * layer.scaling * (layer.lora_B @ layer.lora_A).detach()
        torch.testing.assert_close(layer.base.weight, expected, rtol=1e-5, atol=1e-6)
    moved = adapter_layers(module.model)["model.layers.0.self_attn.q_proj"]
    assert not torch.equal(moved.base.weight, initial["model.layers.0.self_attn.q_proj.weight"])


def test_delta_lora_moves_a_4bit_base_with_a_plain_module():
    module = _fit(UserModule(), "delta_lora", 4)
    for layer in adapter_layers(module).values():
        assert int(layer.folds) == 2  # fold_every=2: folded into the 4-bit base at steps 2 and 4


def _fabric_run(method: str, steps: int, tmp_path, resume_from: str | None = None, save_at: int | None = None):
    fabric = L.Fabric(
        accelerator="cpu",
        devices=1,
        plugins=[FabricNF4Precision(mode="nf4-dq", compute_dtype="fp32", adapter=METHODS[method])],
    )
    L.seed_everything(0)
    model = fabric.setup_module(tiny_llama())
    optimizer = fabric.setup_optimizers(torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2))
    start = 0
    if resume_from is not None:
        state = {"model": model, "optimizer": optimizer, "step": 0}
        fabric.load(resume_from, state)
        start = state["step"]
    ids = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(0))
    losses = []
    for step in range(start, steps):
        loss = model(input_ids=ids, labels=ids).loss
        fabric.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        if save_at is not None and step + 1 == save_at:
            fabric.save(tmp_path / "fabric.ckpt", {"model": model, "optimizer": optimizer, "step": step + 1})
    return model, losses


@pytest.mark.parametrize("method", ["lora", "delta_lora", "adalora", "moe_lora"])
def test_fabric_trains_resumes_and_runs_the_per_step_work(tmp_path, method):
    full, losses = _fabric_run(method, 8, tmp_path)
    _fabric_run(method, 4, tmp_path, save_at=4)
    resumed, _ = _fabric_run(method, 8, tmp_path, resume_from=str(tmp_path / "fabric.ckpt"))
    expected, actual = full.state_dict(), resumed.state_dict()
    assert all(torch.equal(expected[k], actual[k]) for k in expected if isinstance(expected[k], torch.Tensor))
    assert losses[-1] < losses[0]
    if method == "delta_lora":
        assert all(int(layer.folds) == 4 for layer in adapter_layers(full).values())


@pytest.mark.parametrize(("method", "parameter"), [("adalora", "lora_A"), ("moe_lora", "router")])
def test_fabric_backward_includes_the_extra_loss(method, parameter):
    fabric = L.Fabric(
        accelerator="cpu",
        devices=1,
        plugins=[FabricNF4Precision(mode="nf4-dq", compute_dtype="fp32", adapter=METHODS[method])],
    )
    model = fabric.setup_module(tiny_llama())
    ids = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(0))
    fabric.backward(0.0 * model(input_ids=ids).logits.sum())  # no task gradient: only the extra loss's
    layers = adapter_layers(model.module)
    name = "model.layers.0.self_attn.q_proj"
    got = getattr(layers[name], parameter).grad.clone()
    model(input_ids=ids)  # the same forward again (the mixture's balance term comes from it)
    expected = torch.autograd.grad(
        torch.stack([l.extra_loss() for l in layers.values()]).sum(), getattr(layers[name], parameter)
    )[0]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-8)
    assert expected.abs().sum() > 0


def test_every_registered_method_is_in_the_matrix():
    from lightning_qlora.adapters import ADAPTER_CONFIGS

    assert set(METHODS) == set(ADAPTER_CONFIGS)


def test_a_plain_module_and_fabric_train_with_bf16_4bit_matmuls_on_cpu(monkeypatch):
    # NF4Precision(compute_dtype="bf16") on CPU: the converted layers multiply in bf16, everything
    # else (the user's loss, norms, adapters, the float parameters) stays fp32 -- plugin alone.
    from lightning_qlora.quantization import Linear4bit

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    module = _fit(UserModule(), "lora", 4, compute_dtype="bf16")
    fabric = L.Fabric(
        accelerator="cpu",
        devices=1,
        plugins=[FabricNF4Precision(mode="nf4-dq", compute_dtype="bf16", adapter=METHODS["lora"])],
    )
    model = fabric.setup_module(tiny_llama())
    ids = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(0))
    fabric.backward(model(input_ids=ids, labels=ids).loss)
    for converted in (module.model, model.module):
        layers = [m for m in converted.modules() if isinstance(m, Linear4bit)]
        assert layers and all(layer.compute_dtype == torch.bfloat16 for layer in layers)
        assert all(p.dtype == torch.float32 for p in converted.parameters() if p.is_floating_point())
    assert all(torch.isfinite(torch.tensor(module.losses))) and module.losses[-1] < module.losses[0]
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_fit_under_the_pytorch_profiler_with_shapes_and_moves_with_a_weakref_to_a_4bit_weight(tmp_path):
    """Lightning's teardown moves the module to the CPU; a 4-bit weight something holds a weak
    reference to (torch.profiler with record_shapes, a cache keyed by weakref) must not make that
    fail -- torch cannot swap a tensor that has weak references."""
    import weakref

    from lightning.pytorch.profilers import PyTorchProfiler

    from lightning_qlora.quantization.linear import Linear4bit

    module = _fit(  # teardown calls module.cpu()
        UserModule(), "lora", 2, profiler=PyTorchProfiler(dirpath=tmp_path, filename="profile", record_shapes=True)
    )
    assert len(module.losses) == 2
    layer = next(m for m in module.modules() if isinstance(m, Linear4bit))
    watcher = weakref.ref(layer.weight)
    x = torch.randn(3, layer.in_features)
    expected = layer(x)
    module.cpu()
    module.to(torch.float32)
    assert watcher() is not None and torch.equal(layer(x), expected)
    assert all(isinstance(m.weight, torch.nn.Parameter) for m in module.modules() if isinstance(m, Linear4bit))
