"""Put LoRA (or any adapter method) on a 4-bit model, train a few steps, save, export to PEFT.

Run: ``python examples/adapters_on_nf4.py [lora|lora_plus|lora_fa|dora|vera]``
"""

from __future__ import annotations

import sys
import tempfile

import torch
import transformers

from lightning_qlora.adapters import (
    ADAPTER_CONFIGS,
    adapter_param_groups,
    adapter_summary,
    export_peft,
    inject_adapters,
    save_adapters,
)
from lightning_qlora.quantization.convert import quantize_linears


def main(method: str = "lora") -> None:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = transformers.LlamaForCausalLM(config)
    quantized = quantize_linears(model, "nf4", blocksize=64, double_quant=True, skip=("lm_head",))
    adapter = ADAPTER_CONFIGS[method](r=8) if method != "vera" else ADAPTER_CONFIGS[method](r=32)
    inject_adapters(model, adapter, target_modules="all-linear")
    print(f"quantized {len(quantized)} Linear layers to NF4+DQ\n{adapter_summary(model)}")

    optimizer = torch.optim.AdamW(adapter_param_groups(model, lr=1e-2))
    batch = torch.randint(0, 128, (4, 32))
    for step in range(20):
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 5 == 0 or step == 19:
            print(f"step {step:2d}  loss {loss.item():.3f}")

    with tempfile.TemporaryDirectory() as tmp:
        save_adapters(model, f"{tmp}/ours")
        if method in ("lora", "lora_plus", "lora_fa", "dora"):
            export_peft(model, f"{tmp}/peft")
            print("saved our adapter and a PEFT export (adapter_config.json + adapter_model.safetensors)")
        else:
            print("saved our adapter")


if __name__ == "__main__":
    main(*sys.argv[1:2])
