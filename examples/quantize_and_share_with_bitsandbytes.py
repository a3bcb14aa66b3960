"""Quantize a layer to NF4 with double quantization, save it, and load it into bitsandbytes.

Run: ``python examples/quantize_and_share_with_bitsandbytes.py``
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lightning_qlora.quantization import Linear4bit, quantize_4bit, weight_memory


def main() -> None:
    torch.manual_seed(0)
    dense = torch.nn.Linear(1024, 512)

    weight = quantize_4bit(dense.weight, "nf4", blocksize=64, double_quant=True)
    memory = weight_memory(weight)
    error = (weight.dequantize() - dense.weight).abs().max().item()
    print(f"{weight}\n  {memory.bits_per_param:.3f} bits/param, {memory.saved_bytes:,} bytes saved, max |err| {error:.4f}")

    layer = Linear4bit(weight, dense.bias)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "layer.safetensors"
        save_file(layer.state_dict(), path)  # bitsandbytes' keys: weight, weight.absmax, ...
        state = load_file(path)

    import bitsandbytes as bnb

    theirs = bnb.nn.Linear4bit(1024, 512, compute_dtype=torch.float32, quant_type="nf4")
    stats = {k: v for k, v in state.items() if k.startswith("weight.")}
    theirs.weight = bnb.nn.Params4bit.from_prequantized(state["weight"], stats, device="cpu")
    theirs.bias = torch.nn.Parameter(state["bias"])
    x = torch.randn(4, 1024)
    with torch.no_grad():
        difference = (theirs(x) - layer(x)).abs().max().item()
    print(f"bitsandbytes.nn.Linear4bit loaded our state dict; max output difference {difference:.2e}")


if __name__ == "__main__":
    main()
