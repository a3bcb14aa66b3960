"""Lightning plugins: ``NF4Precision`` turns a stock Trainer (or Fabric) into a QLoRA trainer."""

from lightning_qlora.plugins.nf4_precision import FabricNF4Precision, NF4Precision, convert_before_checkpoint_restore

__all__ = ["FabricNF4Precision", "NF4Precision", "convert_before_checkpoint_restore"]
