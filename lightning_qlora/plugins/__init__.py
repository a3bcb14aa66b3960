"""Lightning plugins: ``NF4Precision`` turns a stock Trainer (or Fabric) into a QLoRA trainer;
``FSDPNF4Precision`` is the same for :class:`~lightning_qlora.strategies.QLoRAFSDPStrategy`;
``AtomicCheckpointIO`` writes checkpoints crash-safely (the strategies we ship use it by default)."""

from lightning_qlora.plugins.atomic_checkpoint_io import AtomicCheckpointIO
from lightning_qlora.plugins.fsdp_precision import FSDPNF4Precision
from lightning_qlora.plugins.nf4_precision import (
    CheckpointMismatchError,
    CheckpointModeError,
    FabricNF4Precision,
    NF4Precision,
    check_checkpoint_mode,
    convert_before_checkpoint_restore,
)

__all__ = [
    "AtomicCheckpointIO",
    "CheckpointMismatchError",
    "CheckpointModeError",
    "FSDPNF4Precision",
    "FabricNF4Precision",
    "NF4Precision",
    "check_checkpoint_mode",
    "convert_before_checkpoint_restore",
]
