"""Quantize / dequantize speed on one 4096x4096 fp32 weight: ours (C++), our reference, bitsandbytes, torchao.

Run: ``python benchmarks/kernels.py`` -- median of 7 runs, 2 threads, all on the same weight.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable

import torch

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def median_ms(fn: Callable[[], object], repeats: int = 7) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def main() -> None:
    import bitsandbytes.functional as bnb
    from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4

    from lightning_qlora.ops import _extension, backend, op, reference
    from lightning_qlora.quantization import get_codebook, quantize_4bit

    torch.set_num_threads(2)
    torch.manual_seed(0)
    w = torch.randn(4096, 4096)
    code = get_codebook("nf4")
    rows = []

    def forced_reference_quantize() -> object:
        packed, absmax = reference.quantize_4bit(w, code, 64)
        from lightning_qlora.quantization import double_quantize_absmax

        return double_quantize_absmax(absmax)

    rows.append(("NF4+DQ quantize", median_ms(lambda: quantize_4bit(w, "nf4", 64, check_values=False)),
                 median_ms(forced_reference_quantize),
                 median_ms(lambda: bnb.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)),
                 median_ms(lambda: to_nf4(w, 64, 256))))  # fmt: skip
    packed, absmax = op("quantize_4bit")(w, code, 64)
    bnb_packed, bnb_state = bnb.quantize_4bit(w, blocksize=64, quant_type="nf4")
    nf4 = to_nf4(w, 64, 256)
    for dtype in (torch.float32, torch.bfloat16):
        rows.append((f"NF4 dequantize -> {str(dtype).removeprefix('torch.')}",
                     median_ms(lambda: op("dequantize_4bit")(packed, absmax, code, 64, [4096, 4096], dtype)),
                     median_ms(lambda: reference.dequantize_4bit(packed, absmax, code, 64, [4096, 4096], dtype)),
                     median_ms(lambda: bnb.dequantize_4bit(bnb_packed, bnb_state).to(dtype)) if dtype == torch.float32 else
                     median_ms(lambda: bnb.dequantize_4bit(bnb_packed.clone(), _as_dtype(bnb_state, dtype))),
                     median_ms(lambda: nf4.get_original_weight().to(dtype))))  # fmt: skip
    print(f"backend: {backend()} (extension {'built' if _extension.cpu_extension() else 'missing'}); 4096x4096 fp32, 2 threads, median ms")
    print(f"{'operation':<26}{'ours':>9}{'reference':>11}{'bnb':>9}{'torchao':>9}{'bnb/ours':>10}{'GB/s ours':>11}")
    for name, ours, ref, theirs, ao in rows:
        moved = 4096 * 4096 * (4 + 0.5)  # fp32 one way, 4-bit codes the other
        print(f"{name:<26}{ours:>9.1f}{ref:>11.1f}{theirs:>9.1f}{ao:>9.1f}{theirs / ours:>9.1f}x{moved / ours / 1e6:>11.1f}")


def _as_dtype(state, dtype):
    import copy

    state = copy.copy(state)
    state.dtype = dtype
    return state


if __name__ == "__main__":
    main()
