"""Lightning callbacks that own what changes during adapter training.

* :class:`AdaLoRABudget` -- AdaLoRA's global rank budget schedule and pruning.
* :class:`LoRADrop` -- LoRA-drop's importance stage, layer selection and sharing.
* :class:`AdapterSummary` -- trainable parameters, ranks and quantization savings at fit start.
* :class:`LossCurves` -- training/validation loss PNG at the end of fit.
"""

from lightning_qlora.callbacks.adalora_budget import AdaLoRABudget, budget_schedule, keep_top_triplets
from lightning_qlora.callbacks.adapter_summary import AdapterSummary
from lightning_qlora.callbacks.errors import CallbackConfigError
from lightning_qlora.callbacks.lora_drop import LoRADrop, select_layers
from lightning_qlora.callbacks.loss_curves import LossCurves

__all__ = [
    "AdaLoRABudget",
    "AdapterSummary",
    "CallbackConfigError",
    "LoRADrop",
    "LossCurves",
    "budget_schedule",
    "keep_top_triplets",
    "select_layers",
]
