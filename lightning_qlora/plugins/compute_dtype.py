"""``compute_dtype="auto"``: the dtype that is measurably faster on this machine, chosen once per process.

CPU flags do not say which dtype trains faster: a CPU with AVX512-BF16 but no AMX (the machine
this project is built on) reports native bf16, yet its bf16 matmuls are slower than fp32 ones, and
bf16 autocast adds a cast of every float weight in every forward. So on CPU ``auto`` times a
QLoRA-sized linear forward + backward in both dtypes (about 0.1 s, once per process and thread
count) and takes bf16 only if it is clearly faster (:data:`BF16_MARGIN`). CUDA keeps bf16 (the
design's choice: tensor cores) without measuring.

Example:
    >>> choose_compute_dtype("auto", "cpu") in (torch.float32, torch.bfloat16)  # whichever measured faster
    True
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from lightning_qlora.qlora import resolve_compute_dtype

#: bf16 must take at most this fraction of fp32's time to be chosen (it also costs precision)
BF16_MARGIN = 0.9

#: ``measure(dtype) -> seconds`` of one representative step in that compute dtype
Measure = Callable[[torch.dtype], float]

_CHOSEN: dict[tuple[str, int], torch.dtype] = {}
_TIMINGS: dict[tuple[str, int], dict[str, float]] = {}


def time_linear_step(dtype: torch.dtype, repeats: int = 5) -> float:
    """Median seconds of ``y = x W^T`` forward + input gradient at a SmolLM2-like size, under ``dtype``.

    ``x (256, 576)``, ``W (1536, 576)``: one MLP projection of a batch-8 micro-step's 32 tokens;
    bf16 runs under CPU autocast with fp32 operands, exactly as the plugin's forward context does.
    """
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(1536, 576, generator=generator)
    x = torch.randn(256, 576, generator=generator, requires_grad=True)
    context = torch.autocast("cpu", dtype=dtype) if dtype != torch.float32 else torch.autocast("cpu", enabled=False)

    def step() -> None:
        with context:
            out = torch.nn.functional.linear(x, weight)
        out.float().sum().backward()

    step()  # warm-up: kernels chosen, buffers allocated
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def measured_cpu_dtype(measure: Measure | None = None) -> torch.dtype:
    """fp32 or bf16 for this CPU, by measurement; cached per process and ``torch.get_num_threads()``.

    Args:
        measure: ``dtype -> seconds`` (default :func:`time_linear_step`); a test injects its own.
    """
    key = ("cpu", torch.get_num_threads())
    if key not in _CHOSEN:
        measure = measure or time_linear_step
        fp32, bf16 = measure(torch.float32), measure(torch.bfloat16)
        _TIMINGS[key] = {"fp32_s": fp32, "bf16_s": bf16}
        _CHOSEN[key] = torch.bfloat16 if bf16 <= BF16_MARGIN * fp32 else torch.float32
    return _CHOSEN[key]


def choose_compute_dtype(compute_dtype: str | torch.dtype, device: torch.device | str | None = None,
                         measure: Measure | None = None) -> torch.dtype:  # fmt: skip
    """The compute dtype for ``compute_dtype``: explicit ones as given; ``"auto"`` bf16 on CUDA, measured on CPU.

    Raises:
        QLoRAConfigError: ``compute_dtype`` is not one of the supported names.
    """
    resolved = resolve_compute_dtype(compute_dtype, device)  # validates the name
    if compute_dtype != "auto":
        return resolved
    device_type = torch.device(device).type if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    return measured_cpu_dtype(measure) if device_type == "cpu" else resolved


def measured_compute_dtypes() -> dict[str, dict[str, object]]:
    """What ``auto`` measured and chose in this process, keyed ``"cpu/<threads> threads"`` (for reports)."""
    return {f"{device}/{threads} threads": {**_TIMINGS[(device, threads)], "chosen": str(_CHOSEN[(device, threads)])}
            for device, threads in _CHOSEN}  # fmt: skip


def forget_measurements() -> None:
    """Drop the cached choices (tests; or after changing the thread count deliberately)."""
    _CHOSEN.clear()
    _TIMINGS.clear()
