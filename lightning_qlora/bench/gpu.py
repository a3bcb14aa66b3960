"""``python -m lightning_qlora.bench gpu OUTDIR [--dry-run]``: every CUDA path on a real GPU in one short run.

Made for a bare, offline CUDA machine that lends itself for a few minutes (``make gpu-check OUT=dir``,
run from the source tree with ``PYTHONPATH=.`` and that machine's own ``python3`` and torch). It
writes ``OUTDIR/gpu-check.log`` (everything, children included) and ``OUTDIR/summary.json`` (rewritten
atomically after each step, so a run cut short still leaves what it measured), in three steps:

1. ``build``: the C++ and CUDA extensions (timed: the first op call on each device builds them) and
   the managed-memory library of the paged optimizers; ``lightning_qlora.ops.backend()`` per device.
2. ``benchmark``: 4096^2 and 8192^2 NF4+DQ quantize, dequantize to bf16, batch-1/batch-8 4-bit GEMV vs
   dense bf16 ``F.linear`` (cuBLAS), each with achieved GB/s and the fraction of the H200's 4.8 TB/s;
   a QLoRA layer forward+backward (8x512 tokens, r=16, bf16) vs a dense bf16 layer with the same LoRA.
3. ``pytest``: ``pytest -m cuda tests/cuda`` with ``--junitxml``, parsed into counts and failures.

Each step runs in its own process group under its own time budget (and never past the total), so a
hang or a crash is recorded and the next step still runs. ``--dry-run`` (CI, no GPU) runs the same
code: the build reports the CPU side, the benchmark runs at tiny sizes on the CPU, and the CUDA tests
must all be collected and skipped. The exit status is 0 only if every step succeeded.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
CUDA_TESTS = ROOT / "tests" / "cuda"
#: H200 HBM3e bandwidth (vendor figure), the denominator of every "fraction of peak".
PEAK_GB_S = 4800.0
#: Seconds each step may take at most; the three add up to the 450 s default total (8 min with start-up).
STEP_BUDGETS_S = {"build": 200.0, "benchmark": 80.0, "pytest": 170.0}
TOTAL_BUDGET_S = 450.0
#: (sizes, repeats, QLoRA layer (batch, tokens, features), device) for a real run and for the dry run.
GPU_PLAN = ((4096, 8192), 20, (8, 512, 4096))
DRY_PLAN = ((256,), 3, (2, 16, 256))


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """Atomic write: a temp file beside ``path``, fsync, rename."""
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False) as handle:
        json.dump(data, handle, indent=2, sort_keys=False, default=str)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(handle.name, path)


def _command_output(command: list[str]) -> str | None:
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=20, check=False, cwd=ROOT)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return (result.stdout or result.stderr).strip().splitlines()[-1] if result.returncode == 0 else None


def environment() -> dict[str, Any]:
    """What ran: Python, torch, the device, nvcc and the commit (each best effort)."""
    import torch

    info: dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "nvcc": _command_output(["nvcc", "--version"]),
        "commit": _command_output(["git", "rev-parse", "HEAD"]),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(device=props.name, capability=f"{props.major}.{props.minor}", memory_gib=props.total_memory / 2**30)
    return info


# -- children: each step's work, run as `python -m lightning_qlora.bench.gpu --child STEP RESULT [--dry-run]` ------


def _backend(device: str) -> str | None:
    """``ops.backend(device)`` where the package takes a device, else ``None`` (then inferred by the caller)."""
    from lightning_qlora.ops import backend

    try:
        return backend(device)  # type: ignore[call-arg]
    except TypeError:
        return backend() if device == "cpu" else None


def _timed_build(device: str) -> dict[str, Any]:
    """``ops.build_<device>_extension()`` as a record, where the package has it (else the first call builds)."""
    from lightning_qlora import ops

    builder = getattr(ops, f"build_{device}_extension", None)
    if builder is None:
        return {}
    ok, seconds, error = builder()
    return {"build_ok": ok, "build_s": round(seconds, 2), "build_error": error}


def _first_call(device: str) -> dict[str, Any]:
    """Time the first 4-bit op on ``device`` (which builds its extension) and keep the warnings it raised."""
    import warnings

    import torch

    from lightning_qlora.ops import op, reference
    from lightning_qlora.quantization.codebooks import get_codebook

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        start = time.perf_counter()
        packed, _ = op("quantize_4bit")(torch.randn(4096, device=device), get_codebook("nf4", device), 64)
        packed.cpu()  # waits for the kernel
        seconds = time.perf_counter() - start
    messages = [str(w.message) for w in caught if "lightning_qlora" in str(w.message)]
    # A compiled fused GEMV sums in another order than the reference kernel: never bit-equal on a
    # 4096-wide row, so this tells which kernel ran without asking the (private) loaders.
    w = torch.randn(64, 4096, device=device)
    weight = (*op("quantize_4bit")(w, get_codebook("nf4", device), 64), get_codebook("nf4", device), 64, [64, 4096])
    x = torch.randn(1, 4096, device=device)
    compiled = not torch.equal(op("linear_4bit")(x, *weight), reference.linear_4bit(x, *weight))
    backend = _backend(device)
    if backend is None:  # ops.backend() takes no device: say what ran
        backend = "cuda" if compiled else "reference"
    return {
        "first_call_s": round(seconds, 2),
        "backend": backend,
        "compiled_kernel_ran": compiled,
        "warnings": messages,
    }


def build_step(dry_run: bool) -> dict[str, Any]:
    """Build (by first use) and report the CPU kernels, the CUDA kernels and the managed-memory library."""
    import torch

    result: dict[str, Any] = {"cpu": {**_timed_build("cpu"), **_first_call("cpu")}}
    if not torch.cuda.is_available():
        result["cuda"] = {"skipped": "torch.cuda.is_available() is False" + (" (dry run)" if dry_run else "")}
        return result
    result["cuda"] = {**_timed_build("cuda"), **_first_call("cuda")}
    from lightning_qlora.optim.stores.cuda_managed import managed_memory_ops

    start = time.perf_counter()
    try:
        managed_memory_ops()
        result["paged_memory_library"] = {"build_s": round(time.perf_counter() - start, 2)}
    except Exception as error:  # noqa: BLE001 -- recorded; the paged tests will show the consequence
        result["paged_memory_library"] = {"error": repr(error)}
    if not result["cuda"]["compiled_kernel_ran"]:
        raise RuntimeError(f"the CUDA kernels are not in use: {result['cuda']}")
    return result


def _timer(device: str, repeats: int) -> Callable[[Callable[[], object]], float]:
    """Median milliseconds of ``fn`` after two warm-up calls (CUDA events on a GPU)."""
    import torch

    def median_ms(fn: Callable[[], object]) -> float:
        fn(), fn()
        times = []
        for _ in range(repeats):
            if device == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                start_s = time.perf_counter()
                fn()
                times.append((time.perf_counter() - start_s) * 1000)
        return statistics.median(times)

    return median_ms


def _row(name: str, ms: float, bytes_moved: float, **extra: Any) -> dict[str, Any]:
    gb_s = bytes_moved / ms / 1e6
    return {
        "operation": name,
        "ms": round(ms, 4),
        "GB/s": round(gb_s, 1),
        "fraction_of_peak": round(gb_s / PEAK_GB_S, 3),
        **extra,
    }


def _kernel_rows(size: int, device: str, median_ms: Callable[[Callable[[], object]], float]) -> list[dict[str, Any]]:
    """Quantize, dequantize and GEMV rows for one ``size x size`` bf16 weight (bytes: the least each must touch)."""
    import torch
    import torch.nn.functional as F

    from lightning_qlora.ops import op
    from lightning_qlora.quantization import quantize_4bit

    n = size * size
    w = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    weight = quantize_4bit(w, "nf4", 64, double_quant=True, check_values=False)
    # absmax decoded once (fp32), as serving does; the op reads it in that form
    args = (weight.packed, weight.block_absmax(), weight.code, 64, [size, size])
    four_bit = n / 2 + n / 64 * 4
    rows = [
        _row(
            f"NF4+DQ quantize {size}^2 bf16",
            median_ms(lambda: quantize_4bit(w, "nf4", 64, check_values=False)),
            n * 2 + n / 2 + n / 64,
        ),
        _row(
            f"NF4 dequantize {size}^2 -> bf16",
            median_ms(lambda: op("dequantize_4bit")(*args, torch.bfloat16)),
            four_bit + n * 2,
        ),
    ]
    for batch in (1, 8):
        x = torch.randn(batch, size, device=device, dtype=torch.bfloat16)
        dense_ms = median_ms(lambda: F.linear(x, w))
        ours_ms = median_ms(lambda: op("linear_4bit")(x, *args))
        io = 2 * batch * size * 2
        rows.append(
            _row(
                f"4-bit GEMV batch {batch} {size}^2",
                ours_ms,
                four_bit + io,
                speedup_vs_dense=round(dense_ms / ours_ms, 2),
            )
        )
        rows.append(_row(f"dense bf16 F.linear batch {batch} {size}^2", dense_ms, n * 2 + io))
    return rows


def _layer_row(
    shape: tuple[int, int, int], device: str, median_ms: Callable[[Callable[[], object]], float]
) -> dict[str, Any]:
    """QLoRA layer (NF4+DQ base, LoRA r=16) fwd+bwd vs the same LoRA on a dense bf16 base (input grads too)."""
    import torch
    from torch import nn

    from lightning_qlora.adapters import LoRAConfig
    from lightning_qlora.qlora import QLoRASpec, apply_qlora

    batch, tokens, features = shape
    timings = {}
    grad_out = torch.randn(batch, tokens, features, device=device, dtype=torch.bfloat16)
    x = torch.randn(batch, tokens, features, device=device, dtype=torch.bfloat16, requires_grad=True)
    for mode in ("nf4-dq", "none"):
        torch.manual_seed(0)
        layer = nn.Sequential(nn.Linear(features, features, bias=False, device=device, dtype=torch.bfloat16))
        apply_qlora(layer, QLoRASpec(mode=mode, adapter=LoRAConfig(r=16, alpha=32), skip_modules=()))
        layer.to(device)
        inputs = [x, *(p for p in layer.parameters() if p.requires_grad)]
        timings[mode] = median_ms(lambda: torch.autograd.grad(layer(x), inputs, grad_out))  # noqa: B023 -- timed now
    return {
        "operation": f"QLoRA layer fwd+bwd {batch}x{tokens} tokens, {features}^2, r=16, bf16",
        "ms": round(timings["nf4-dq"], 3),
        "dense_bf16_lora_ms": round(timings["none"], 3),
        "ratio_vs_dense": round(timings["nf4-dq"] / timings["none"], 3),
    }


def benchmark_step(dry_run: bool) -> dict[str, Any]:
    """The kernel table (see the module docstring); tiny sizes on the CPU in a dry run."""
    import torch

    device = "cuda" if torch.cuda.is_available() and not dry_run else "cpu"
    if device == "cpu" and not dry_run:
        raise RuntimeError("no CUDA device: the GPU benchmark needs one (use --dry-run on a CPU machine)")
    sizes, repeats, layer_shape = DRY_PLAN if dry_run else GPU_PLAN
    median_ms = _timer(device, repeats)
    rows = [row for size in sizes for row in _kernel_rows(size, device, median_ms)]
    rows.append(_layer_row(layer_shape, device, median_ms))
    return {"device": device, "peak_GB_s": PEAK_GB_S, "repeats": repeats, "rows": rows}


def _child(step: str, result_path: Path, dry_run: bool) -> int:
    result = {"build": build_step, "benchmark": benchmark_step}[step](dry_run)
    _write_json(result_path, result)
    return 0


# -- the driver ------------------------------------------------------------------------------------------


def parse_junit(path: Path) -> dict[str, Any]:
    """Counts, failures (with their messages) and skip reasons from pytest's ``--junitxml`` file."""
    cases = list(ET.parse(path).getroot().iter("testcase"))
    outcome: Counter[str] = Counter()
    failures, skips, durations = [], Counter(), []
    for case in cases:
        test_id = f"{case.get('classname')}::{case.get('name')}"
        durations.append((float(case.get("time") or 0.0), test_id))
        status = next((child for child in case if child.tag in ("failure", "error", "skipped")), None)
        if status is None:
            outcome["passed"] += 1
        elif status.tag == "skipped":
            outcome["skipped"] += 1
            skips[(status.get("message") or "")[:200]] += 1
        else:
            outcome["failed" if status.tag == "failure" else "errors"] += 1
            text = status.get("message") or status.text or ""
            failures.append({"test": test_id, "kind": status.tag, "message": text[:1500]})
    return {
        "collected": len(cases),
        **{k: outcome[k] for k in ("passed", "failed", "errors", "skipped")},
        "failures": failures,
        "skip_reasons": dict(skips),
        "slowest": [{"test": t, "s": round(s, 2)} for s, t in sorted(durations, reverse=True)[:10]],
    }


class GpuCheck:
    """Runs the steps one after the other under their budgets, logging and summarizing as it goes."""

    def __init__(self, outdir: Path, dry_run: bool, total_budget_s: float) -> None:
        self.outdir, self.dry_run = outdir, dry_run
        self.start = time.monotonic()
        self.deadline = self.start + total_budget_s
        self.log_path, self.summary_path = outdir / "gpu-check.log", outdir / "summary.json"
        self.log_path.write_text("")
        started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self.summary: dict[str, Any] = {
            "dry_run": dry_run,
            "started": started,
            "total_budget_s": total_budget_s,
            "steps": {},
        }

    def log(self, message: str) -> None:
        line = f"[{time.monotonic() - self.start:7.1f}s] {message}"
        print(line, flush=True)
        with self.log_path.open("a") as handle:
            handle.write(line + "\n")

    def _run(self, command: list[str], budget_s: float) -> tuple[int | None, float]:
        """Run ``command`` in its own process group, output into the log; ``(returncode or None on timeout, s)``."""
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
        env.setdefault("HF_HUB_OFFLINE", "1")
        start = time.monotonic()
        with self.log_path.open("a") as log:
            process = subprocess.Popen(
                command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
            try:
                return process.wait(timeout=budget_s), time.monotonic() - start
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)  # the whole group: nvcc, ninja, pytest workers
                process.wait()
                return None, time.monotonic() - start

    def step(self, name: str, command: list[str] | None, read_result: Callable[[int], dict[str, Any]]) -> None:
        """Run one step (``command=None``: it cannot run, ``read_result`` says why) and record it."""
        budget = min(STEP_BUDGETS_S[name], self.deadline - time.monotonic())
        record: dict[str, Any] = {"budget_s": round(budget, 1)}
        if command is None:
            record.update(status="failed", **read_result(-1))
        elif budget < 5:
            record.update(status="skipped", error="no time left in the total budget")
        else:
            self.log(f"step {name}: start (budget {budget:.0f} s): {' '.join(command)}")
            returncode, seconds = self._run(command, budget)
            record["wall_s"] = round(seconds, 1)
            if returncode is None:
                record.update(status="timeout", error=f"killed after {budget:.0f} s")
            else:
                try:
                    record.update(status="ok", returncode=returncode, result=read_result(returncode))
                except Exception as error:  # noqa: BLE001 -- a failed step is recorded, the next one runs
                    record.update(status="failed", returncode=returncode, error=repr(error))
        self.log(f"step {name}: {record['status']}" + (f" ({record['error']})" if "error" in record else ""))
        self.summary["steps"][name] = record
        self.summary["wall_s"] = round(time.monotonic() - self.start, 1)
        _write_json(self.summary_path, self.summary)

    def _child_step(self, name: str) -> None:
        result_path = self.outdir / f"{name}.json"
        result_path.unlink(missing_ok=True)
        command = [sys.executable, "-m", "lightning_qlora.bench.gpu", "--child", name, str(result_path)]

        def read(returncode: int) -> dict[str, Any]:
            if returncode != 0 or not result_path.exists():
                raise RuntimeError(f"exit status {returncode}; see {self.log_path.name}")
            return json.loads(result_path.read_text())

        self.step(name, command + (["--dry-run"] if self.dry_run else []), read)

    def _pytest_step(self) -> None:
        junit = self.outdir / "pytest-cuda.xml"
        junit.unlink(missing_ok=True)
        command = [
            sys.executable,
            "-m",
            "pytest",
            str(CUDA_TESTS.relative_to(ROOT)),
            "-m",
            "cuda",
            "-q",
            "-rfEs",
            "-p",
            "no:cacheprovider",
            f"--junitxml={junit}",
        ]

        def read(returncode: int) -> dict[str, Any]:
            if not junit.exists():
                raise RuntimeError(f"pytest exited {returncode} without a report; see {self.log_path.name}")
            result = parse_junit(junit)
            if result["collected"] == 0:
                raise RuntimeError("no CUDA tests were collected")
            if self.dry_run and result["skipped"] != result["collected"]:
                raise RuntimeError(f"dry run: every CUDA test must be skipped without a GPU, got {result}")
            if result["failed"] or result["errors"] or returncode != 0:
                raise RuntimeError(
                    f"{result['failed']} failed, {result['errors']} errors (exit {returncode}): "
                    + "; ".join(f["test"] for f in result["failures"][:20])
                )
            return result

        if not CUDA_TESTS.is_dir():  # an installed wheel: the tests live in the source tree only
            self.step("pytest", None, lambda _: {"error": f"{CUDA_TESTS} not found; run from the source tree"})
            return
        self.step("pytest", command, read)
        if self.summary["steps"]["pytest"]["status"] == "failed" and junit.exists():
            self.summary["steps"]["pytest"]["result"] = parse_junit(junit)  # the counts, next to the error
            _write_json(self.summary_path, self.summary)

    def run(self) -> bool:
        self.log(f"gpu-check{' (dry run)' if self.dry_run else ''}: results in {self.outdir}")
        self.summary["environment"] = environment()
        self.log(f"environment: {json.dumps(self.summary['environment'])}")
        self._child_step("build")
        self._child_step("benchmark")
        self._pytest_step()
        self.summary["ok"] = all(s["status"] == "ok" for s in self.summary["steps"].values())
        _write_json(self.summary_path, self.summary)
        self._print_table()
        return self.summary["ok"]

    def _print_table(self) -> None:
        for name, record in self.summary["steps"].items():
            self.log(f"{name:<10} {record['status']:<8} {record.get('wall_s', 0):>6.1f} s  {record.get('error', '')}")
        for row in self.summary["steps"].get("benchmark", {}).get("result", {}).get("rows", []):
            self.log("  " + ", ".join(f"{k}={v}" for k, v in row.items()))
        tests = self.summary["steps"].get("pytest", {}).get("result")
        if tests:
            counts = ("collected", "passed", "failed", "errors", "skipped")
            self.log("  pytest: " + ", ".join(f"{k} {tests[k]}" for k in counts))
        self.log(f"gpu-check: {'OK' if self.summary['ok'] else 'FAILED'} in {self.summary['wall_s']} s")


def main(argv: list[str]) -> int:
    """Entry point of ``python -m lightning_qlora.bench gpu``; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m lightning_qlora.bench gpu", description=__doc__.split("\n")[0])
    parser.add_argument("outdir", type=Path, help="folder for gpu-check.log, summary.json and the pytest report")
    parser.add_argument("--dry-run", action="store_true", help="no GPU: CPU half of the benchmark, CUDA tests skipped")
    parser.add_argument("--budget-s", type=float, default=TOTAL_BUDGET_S, help="total seconds for all steps")
    args = parser.parse_args(argv)
    if args.budget_s <= 0:
        parser.error(f"--budget-s={args.budget_s} must be positive (default {TOTAL_BUDGET_S:.0f}).")
    args.outdir.mkdir(parents=True, exist_ok=True)
    return 0 if GpuCheck(args.outdir.resolve(), args.dry_run, args.budget_s).run() else 1


if __name__ == "__main__":
    if len(sys.argv) >= 4 and sys.argv[1] == "--child":
        sys.exit(_child(sys.argv[2], Path(sys.argv[3]), "--dry-run" in sys.argv[4:]))
    sys.exit(main(sys.argv[1:]))
