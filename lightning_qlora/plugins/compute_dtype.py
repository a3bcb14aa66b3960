"""``compute_dtype="auto"``: the dtype that is measurably faster on this machine, chosen once per process.

CPU flags do not say which dtype trains faster: measured on the machines this project is built
on, a CPU with AVX512-BF16 but no AMX runs bf16 matmuls 3-5x slower than fp32 ones; one with AMX
runs them 2-4x faster, yet bf16 *autocast* over a whole model made its main-job step slower than
fp32 (casts of every activation, bf16 attention backward). On CPU a 16-bit compute dtype now applies to the 4-bit layers' matmuls only
(each converted ``Linear4bit``'s ``compute_dtype``, bitsandbytes' meaning), and ``auto`` times a
SmolLM2-sized QLoRA layer (4-bit base + LoRA, forward + backward, our kernels) with fp32 and
with bf16 matmuls, interleaved (about 0.1-0.3 s, once per process and thread count), and takes
bf16 only if it is clearly faster (:data:`BF16_MARGIN`). CUDA keeps bf16 (the design's choice:
tensor cores) without measuring.

Example:
    >>> choose_compute_dtype("auto", "cpu") in (torch.float32, torch.bfloat16)  # whichever measured faster
    True
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from lightning_qlora.qlora import resolve_compute_dtype

#: bf16 must take at most this fraction of fp32's time to be chosen (it also costs precision)
BF16_MARGIN = 0.9

#: timed steps per dtype (after one warm-up each)
ROUNDS = 5

#: ``measure(dtype) -> seconds`` of one representative step in that compute dtype
Measure = Callable[[torch.dtype], float]

_CHOSEN: dict[tuple[str, int], torch.dtype] = {}
_TIMINGS: dict[tuple[str, int], dict[str, float]] = {}


_PROBE: list[tuple[torch.nn.Module, torch.Tensor]] = []


def _probe_layer() -> tuple[torch.nn.Module, torch.Tensor]:
    """A SmolLM2-sized QLoRA layer (NF4-DQ ``(1536, 576)`` + LoRA r=16, dropout 0.05) and a batch-8 x 32-token input."""
    if not _PROBE:
        from lightning_qlora.adapters import LoRAConfig
        from lightning_qlora.quantization import Linear4bit

        generator = torch.Generator().manual_seed(0)
        linear = torch.nn.Linear(576, 1536, bias=False)
        with torch.no_grad():
            linear.weight.copy_(torch.randn(1536, 576, generator=generator) * 0.02)
        layer = LoRAConfig(r=16, alpha=32.0, dropout=0.05).build(Linear4bit.from_linear(linear)).train()
        _PROBE.append((layer, torch.randn(256, 576, generator=generator)))
    return _PROBE[0]


def time_qlora_layer_step(dtype: torch.dtype) -> float:
    """Seconds of one forward + backward of :func:`_probe_layer` in compute ``dtype``.

    The real path, our kernels included: the 4-bit weight dequantized to the compute dtype, the
    LoRA update, the input gradient; in :func:`matmul_dtype`, as the plugin's converted layers on CPU.
    """
    from lightning_qlora.quantization import matmul_dtype

    layer, x = _probe_layer()
    x = x.clone().requires_grad_()
    start = time.perf_counter()
    with matmul_dtype(None if dtype == torch.float32 else dtype):
        out = layer(x)
    out.square().sum().backward()
    layer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def measured_cpu_dtype(measure: Measure | None = None, rounds: int = ROUNDS) -> torch.dtype:
    """fp32 or bf16 for this CPU, by measurement; cached per process and ``torch.get_num_threads()``.

    One warm-up step per dtype, then ``rounds`` steps of each, interleaved (a busy machine slows
    both alike), compared by median. torch's global random state is left as it was found.

    Args:
        measure: ``dtype -> seconds`` of one step (default :func:`time_qlora_layer_step`); a test injects its own.
        rounds: timed steps per dtype.
    """
    key = ("cpu", torch.get_num_threads())
    if key not in _CHOSEN:
        measure = measure or time_qlora_layer_step
        times: dict[torch.dtype, list[float]] = {torch.float32: [], torch.bfloat16: []}
        # the probe's LoRA init and dropout masks draw from torch's global generator: restore it, so a
        # seeded run gets the same adapters and dropout whether or not (and whenever) auto measured
        with torch.random.fork_rng(devices=[]):
            for index in range(rounds + 1):
                for dtype, values in times.items():
                    seconds = measure(dtype)
                    if index > 0:
                        values.append(seconds)
        fp32, bf16 = statistics.median(times[torch.float32]), statistics.median(times[torch.bfloat16])
        _TIMINGS[key] = {"fp32_s": fp32, "bf16_s": bf16}
        _CHOSEN[key] = torch.bfloat16 if bf16 <= BF16_MARGIN * fp32 else torch.float32
    return _CHOSEN[key]


def choose_compute_dtype(
    compute_dtype: str | torch.dtype, device: torch.device | str | None = None, measure: Measure | None = None
) -> torch.dtype:
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
    return {
        f"{device}/{threads} threads": {**_TIMINGS[(device, threads)], "chosen": str(_CHOSEN[(device, threads)])}
        for device, threads in _CHOSEN
    }


def forget_measurements() -> None:
    """Drop the cached choices (tests; or after changing the thread count deliberately)."""
    _CHOSEN.clear()
    _TIMINGS.clear()
