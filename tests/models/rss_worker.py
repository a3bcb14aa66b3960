"""Subprocess of the streaming-memory test: load a checkpoint in NF4+DQ and report memory as JSON.

``python -m tests.models.rss_worker <dir>`` prints ``{"baseline_kb", "peak_kb", "model_bytes", ...}``:
the resident set just before the load, the peak (``VmHWM``, reset first through
``/proc/self/clear_refs`` where the kernel allows it) and the exact bytes the loaded model holds.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import torch


def _status_kb(field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1))


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes held by parameters and buffers (4-bit weights at their exact storage size, shared ones once)."""
    from lightning_qlora.quantization import Quantized4bitTensor

    seen, total = set(), 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        quantized = isinstance(tensor, Quantized4bitTensor)
        total += tensor.storage_nbytes() if quantized else tensor.numel() * tensor.element_size()
    return total


def main(directory: str) -> None:
    import transformers  # noqa: F401  (imports and the kernels' first use are not the load's memory)

    from lightning_qlora.models import load_causal_lm
    from lightning_qlora.quantization import quantize_4bit

    quantize_4bit(torch.randn(64, 64))
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    except OSError:
        pass
    baseline = _status_kb("VmRSS")
    model, _ = load_causal_lm(directory, mode="nf4-dq", compute_dtype="fp32", progress=False)
    print(
        json.dumps(
            {
                "baseline_kb": baseline,
                "peak_kb": _status_kb("VmHWM"),
                "final_kb": _status_kb("VmRSS"),
                "model_bytes": model_bytes(model),
            }
        )
    )


if __name__ == "__main__":
    main(sys.argv[1])
