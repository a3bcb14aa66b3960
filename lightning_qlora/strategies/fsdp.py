"""``QLoRAFSDPStrategy``: FSDP for QLoRA models, on CUDA and on CPU (gloo).

QLoRA's frozen 4-bit weights are already ~8x smaller than the float weights and cannot be
flattened into FSDP's float flat parameters, so this strategy lists every module holding a
4-bit weight in FSDP's ``ignored_states`` (each rank keeps its own copy, identical because the
float weights are synchronized before quantization) and shards the rest: adapters,
embeddings, norms and their optimizer state. ``use_orig_params=True`` lets frozen and trainable
float parameters share a flat parameter.

Lightning's own ``FSDPStrategy`` refuses the CPU accelerator; FSDP training works on CPU with
the gloo backend, which is how this is tested here (2 processes: the loss curve equals one
process with the same global batch, and each rank holds half of the float parameters).

What was verified and what was not (torch 2.13, CPU): training, and checkpoints written as
sharded (``torch.distributed.checkpoint``) directories -- the default on CPU, because FSDP's
full-state-dict gathering crashes inside torch on CPU (it reads a freed unsharded storage) --
from which ``fit(ckpt_path=...)`` resumes to a bit-identical loss curve. On CUDA none of this
could be run here.
Use it with :class:`~lightning_qlora.plugins.FSDPNF4Precision`::

    Trainer(accelerator="cpu", devices=2, strategy=QLoRAFSDPStrategy(),
            plugins=[FSDPNF4Precision(mode="nf4-dq", adapter=LoRAConfig(r=16))])
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.strategies import FSDPStrategy
from torch import nn
from typing_extensions import override

from lightning_qlora.plugins.atomic_checkpoint_io import AtomicCheckpointIODefault
from lightning_qlora.quantization.tensor import Quantized4bitTensor


def modules_with_4bit_weights(module: nn.Module) -> list[nn.Module]:
    """Every submodule that directly holds a 4-bit weight (the states FSDP must ignore)."""
    return [m for m in module.modules() if any(isinstance(p, Quantized4bitTensor) for p in m.parameters(recurse=False))]


class QLoRAFSDPStrategy(AtomicCheckpointIODefault, FSDPStrategy):
    """FSDP that shards everything except the frozen 4-bit weights; registered as ``"qlora_fsdp"``.

    Args:
        process_group_backend: ``None`` picks nccl on CUDA, gloo on CPU.
        **kwargs: passed to :class:`~lightning.pytorch.strategies.FSDPStrategy` (``auto_wrap_policy``,
            ``sharding_strategy``, ``state_dict_type``...).
    """

    strategy_name = "qlora_fsdp"

    def __init__(self, process_group_backend: str | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("use_orig_params", True)
        self._state_dict_type_given = "state_dict_type" in kwargs
        super().__init__(process_group_backend=process_group_backend, **kwargs)

    @override
    def setup_environment(self) -> None:
        super().setup_environment()
        if self.root_device.type == "cpu" and not self._state_dict_type_given:
            self._state_dict_type = "sharded"  # full state dicts crash in torch's FSDP on CPU (module docstring)

    @override
    def _setup_model(self, model: nn.Module) -> nn.Module:
        ignored = modules_with_4bit_weights(model)
        if ignored:
            self.kwargs["ignored_states"] = [*self.kwargs.get("ignored_states", []), *ignored]
        from torch.distributed.fsdp import FullyShardedDataParallel

        if self.root_device.type != "cpu" or any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
            return super()._setup_model(model)
        # Lightning passes device_id=root_device.index, which is None on CPU, and FSDP then looks
        # for an accelerator; naming the CPU device keeps FSDP on it (activation checkpointing is
        # not applied on this path)
        return FullyShardedDataParallel(
            module=model,
            cpu_offload=self.cpu_offload,
            mixed_precision=self.mixed_precision_config,
            sharding_strategy=self.sharding_strategy,
            device_id=self.root_device,
            **self.kwargs,
        )

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: Any) -> None:
        strategy_registry.register(cls.strategy_name, cls, description="FSDP for QLoRA (4-bit weights not sharded)")
