"""NF4 kernel speed on one 4096x4096 fp32 weight: ours, our reference, bitsandbytes (CPU), torchao.

Run ``python -m lightning_qlora.bench kernels``: median of several runs at 2 threads, every
implementation on the same weight in one process. Ratios are bitsandbytes time / ours; GB/s
counts the bytes an operation must touch at least (fp32 in or out, 4-bit codes, absmax).
"""

from __future__ import annotations

import copy
import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

SIZE = 4096
REPEATS = 9


@dataclass
class Row:
    """One operation timed four ways (milliseconds; ``nan`` where an implementation has none)."""

    name: str
    ours: float
    reference: float
    bnb: float
    torchao: float
    bytes_moved: float


def median_ms(fn: Callable[[], object], repeats: int = REPEATS) -> float:
    """Median wall time of ``fn`` in ms after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def _with_dtype(state: object, dtype: torch.dtype) -> object:
    state = copy.copy(state)
    state.dtype = dtype  # bitsandbytes' CPU dequantize writes the state's dtype
    return state


def _dequantize_row(dtype: torch.dtype, size: int, packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                    bnb_packed: torch.Tensor, bnb_state: object, nf4: torch.Tensor) -> Row:
    """Dequantize the weight to ``dtype`` four ways (a function so each lambda binds this dtype)."""
    import bitsandbytes.functional as bnb

    from lightning_qlora.ops import op, reference

    shape = [SIZE, SIZE]
    return Row(f"NF4 dequantize -> {str(dtype).removeprefix('torch.')}",
               median_ms(lambda: op("dequantize_4bit")(packed, absmax, code, 64, shape, dtype)),
               median_ms(lambda: reference.dequantize_4bit(packed, absmax, code, 64, shape, dtype), 3),
               median_ms(lambda: bnb.dequantize_4bit(bnb_packed, bnb_state)),
               median_ms(lambda: nf4.get_original_weight().to(dtype), 3), 0.0)  # fmt: skip


def measure() -> tuple[list[Row], dict[str, float]]:
    """Time every operation; returns the rows and a few standalone figures (dense GEMV)."""
    import bitsandbytes as bnb_nn
    import bitsandbytes.functional as bnb
    from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import linear_nf4, to_nf4

    from lightning_qlora.ops import op, reference
    from lightning_qlora.quantization import double_quantize_absmax, get_codebook, quantize_4bit

    torch.manual_seed(0)
    w = torch.randn(SIZE, SIZE)
    code = get_codebook("nf4")
    n = w.numel()
    packed_bytes, absmax_bytes = n / 2, n / 64 * 4

    def reference_quantize() -> object:
        return double_quantize_absmax(reference.quantize_4bit(w, code, 64)[1])

    rows = [Row("NF4+DQ quantize fp32", median_ms(lambda: quantize_4bit(w, "nf4", 64, check_values=False)),
                median_ms(reference_quantize, 3),
                median_ms(lambda: bnb.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)),
                median_ms(lambda: to_nf4(w, 64, 256), 3), n * 4 + packed_bytes)]  # fmt: skip
    packed, absmax = op("quantize_4bit")(w, code, 64)
    bnb_packed, bnb_state = bnb.quantize_4bit(w, blocksize=64, quant_type="nf4")
    nf4 = to_nf4(w, 64, 256)
    for dtype, size in ((torch.float32, 4), (torch.bfloat16, 2)):
        rows.append(_dequantize_row(dtype, size, packed, absmax, code, bnb_packed, _with_dtype(bnb_state, dtype), nf4))
        rows[-1].bytes_moved = n * size + packed_bytes + absmax_bytes

    # Batch-1 GEMV with NF4+DQ weights on both sides (absmax decoded inside the call, as in a layer).
    x = torch.randn(1, SIZE)
    ours_dq = quantize_4bit(w, "nf4", 64)

    def linear_4bit(inputs: torch.Tensor, weight: object) -> torch.Tensor:
        return op("linear_4bit")(inputs, weight.packed, weight.block_absmax(), weight.code, 64, [SIZE, SIZE])
    bnb_dq, bnb_dq_state = bnb.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    rows.append(Row("NF4+DQ GEMV batch 1", median_ms(lambda: linear_4bit(x, ours_dq), 50),
                    median_ms(lambda: reference.linear_4bit(x, packed, absmax, code, 64, [SIZE, SIZE]), 3),
                    median_ms(lambda: bnb_nn.matmul_4bit(x, bnb_dq.t(), quant_state=bnb_dq_state), 20),
                    median_ms(lambda: linear_nf4(x, nf4), 5),
                    packed_bytes + n / 64 + SIZE * 8))  # fmt: skip
    x8 = torch.randn(8, SIZE)
    rows.append(Row("NF4+DQ GEMV batch 8", median_ms(lambda: linear_4bit(x8, ours_dq), 20), float("nan"),
                    median_ms(lambda: bnb_nn.matmul_4bit(x8, bnb_dq.t(), quant_state=bnb_dq_state), 5),
                    median_ms(lambda: linear_nf4(x8, nf4), 5), packed_bytes + n / 64 + SIZE * 64))  # fmt: skip
    dense = {"dense fp32 F.linear batch 1": median_ms(lambda: torch.nn.functional.linear(x, w), 50),
             "dense fp32 F.linear batch 8": median_ms(lambda: torch.nn.functional.linear(x8, w), 20)}  # fmt: skip
    return rows, dense


def main() -> None:
    """Print the table (see the module docstring)."""
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    from lightning_qlora.ops import backend

    torch.set_num_threads(2)
    rows, dense = measure()
    print(f"backend: {backend()}; {SIZE}x{SIZE} fp32 weight, blocksize 64, {torch.get_num_threads()} threads, "
          f"median ms")  # fmt: skip
    print(f"{'operation':<26}{'ours':>9}{'reference':>11}{'bnb':>9}{'torchao':>9}{'bnb/ours':>10}{'GB/s ours':>11}")
    for row in rows:
        print(f"{row.name:<26}{row.ours:>9.2f}{row.reference:>11.1f}{row.bnb:>9.2f}{row.torchao:>9.1f}"
              f"{row.bnb / row.ours:>9.1f}x{row.bytes_moved / row.ours / 1e6:>11.1f}")  # fmt: skip
    for name, ms in dense.items():
        print(f"{name:<26}{ms:>9.2f}   (reads {SIZE * SIZE * 4 / ms / 1e6:.1f} GB/s)")
