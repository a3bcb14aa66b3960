"""Adapters: small trainable modules on frozen (4-bit or float) Linear layers.

One file per method behind :class:`AdapterLayer`; :func:`inject_adapters` wraps a model's
targets; :mod:`~lightning_qlora.adapters.io` saves/loads adapters alone and exports PEFT's
layout.
"""

from lightning_qlora.adapters.adalora import AdaLoRAConfig, AdaLoRALayer
from lightning_qlora.adapters.base import (
    AdapterConfig,
    AdapterConfigError,
    AdapterLayer,
    CapabilityError,
    LoRAFactors,
    MergeReport,
    PeftState,
)
from lightning_qlora.adapters.delta_lora import DeltaLoRAConfig, DeltaLoRALayer, delta_lora_step
from lightning_qlora.adapters.dora import DoRAConfig, DoRALayer
from lightning_qlora.adapters.inject import (
    adapter_extra_loss,
    adapter_layers,
    adapter_param_groups,
    after_optimizer_step,
    find_targets,
    inject_adapters,
)
from lightning_qlora.adapters.io import (
    AdapterFileError,
    AdapterFiles,
    export_peft,
    import_peft,
    load_adapters,
    read_adapter_files,
    save_adapters,
)
from lightning_qlora.adapters.lora import LoRAConfig, LoRALayer
from lightning_qlora.adapters.lora_drop import (
    LoRADropConfig,
    LoRADropLayer,
    SharedLoRA,
    apply_lora_drop,
    restore_lora_drop_structure,
)
from lightning_qlora.adapters.lora_fa import LoRAFAConfig, LoRAFALayer
from lightning_qlora.adapters.lora_plus import LoRAPlusConfig, LoRAPlusLayer
from lightning_qlora.adapters.merge import export_merged, merged_state_dict
from lightning_qlora.adapters.mixture import MixtureLoRAConfig, MixtureLoRALayer
from lightning_qlora.adapters.registry import ADAPTER_CONFIGS, config_from_dict
from lightning_qlora.adapters.summary import adapter_summary, trainable_parameter_count
from lightning_qlora.adapters.vera import VeRAConfig, VeRALayer

__all__ = [
    "ADAPTER_CONFIGS",
    "AdaLoRAConfig",
    "AdaLoRALayer",
    "AdapterConfig",
    "AdapterConfigError",
    "AdapterFileError",
    "AdapterFiles",
    "AdapterLayer",
    "CapabilityError",
    "LoRAFactors",
    "PeftState",
    "DeltaLoRAConfig",
    "DeltaLoRALayer",
    "DoRAConfig",
    "DoRALayer",
    "LoRAConfig",
    "LoRADropConfig",
    "LoRADropLayer",
    "LoRAFAConfig",
    "LoRAFALayer",
    "LoRALayer",
    "LoRAPlusConfig",
    "LoRAPlusLayer",
    "MergeReport",
    "MixtureLoRAConfig",
    "MixtureLoRALayer",
    "SharedLoRA",
    "VeRAConfig",
    "VeRALayer",
    "adapter_extra_loss",
    "adapter_layers",
    "adapter_param_groups",
    "adapter_summary",
    "after_optimizer_step",
    "apply_lora_drop",
    "restore_lora_drop_structure",
    "config_from_dict",
    "delta_lora_step",
    "export_merged",
    "export_peft",
    "find_targets",
    "import_peft",
    "inject_adapters",
    "load_adapters",
    "read_adapter_files",
    "merged_state_dict",
    "save_adapters",
    "trainable_parameter_count",
]
