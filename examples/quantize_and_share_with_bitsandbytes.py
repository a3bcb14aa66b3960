"""Quantize a layer to NF4 with double quantization, save it, and load it into bitsandbytes.

The 4-bit codes and constants are bit-exact with bitsandbytes; the layers' outputs agree up to
fp32 round-off (our small-batch forward sums in another order: the fused GEMV).

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
    print(
        f"{weight}\n  {memory.bits_per_param:.3f} bits/param, {memory.saved_bytes:,} bytes saved, max |err| {error:.4f}"
    )

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
    same_codes = torch.equal(theirs.weight.data.reshape(-1), layer.weight.packed.reshape(-1))
    x = torch.randn(4, 1024)
    with torch.no_grad():
        difference = (theirs(x) - layer(x)).abs().max().item()
        # Same weight values, another fp32 summation order (our batch-4 forward is the fused GEMV):
        # each order is within n * eps * sum|x w| of the exact product (Higham's gamma_n), so two are within 2x that.
        magnitude = (x.abs() @ weight.dequantize().abs().t()).max().item()
    bound = 2 * 1024 * torch.finfo(torch.float32).eps * magnitude
    print(
        f"bitsandbytes.nn.Linear4bit loaded our state dict; codes bit-exact: {same_codes}; "
        f"max output difference {difference:.2e} (round-off bound {bound:.2e})"
    )


if __name__ == "__main__":
    main()
