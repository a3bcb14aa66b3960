"""The GPU check's dry run works where only the GPU machine's packages exist (CPU test, not ``cuda``-marked).

The GPU machine has no hydra-core, wandb, litserve, bitsandbytes, gguf, hypothesis, matplotlib,
rich or torchao; ``gpu_machine_site/sitecustomize.py`` hides them from every process of the run,
so an import of one anywhere under the script or the CUDA tests (directly or through
``lightning_qlora``) fails here as it would there.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from lightning_qlora.bench.gpu import parse_junit

ROOT = Path(__file__).resolve().parents[2]
SITE = Path(__file__).resolve().parent / "gpu_machine_site"


def _gpu_machine_env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(SITE), str(ROOT)]))


def test_the_blocker_really_hides_the_missing_packages():
    probe = (
        "import importlib.util, importlib.metadata as m\n"
        "assert importlib.util.find_spec('bitsandbytes') is None\n"
        "try:\n    m.version('hydra-core')\nexcept m.PackageNotFoundError:\n    print('hidden')\n"
        "import lightning_qlora.ops, torch; print(torch.__version__)"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], env=_gpu_machine_env(), capture_output=True, text=True, check=True, timeout=300
    ).stdout
    assert out.splitlines()[0] == "hidden"


@pytest.mark.slow
def test_dry_run_collects_and_skips_every_cuda_test_without_the_missing_packages(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "lightning_qlora.bench", "gpu", str(tmp_path), "--dry-run"],
        env=_gpu_machine_env(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    summary = json.loads((tmp_path / "summary.json").read_text())
    log = (tmp_path / "gpu-check.log").read_text()
    assert result.returncode == 0 and summary["ok"], log[-6000:]
    assert summary["dry_run"] and not summary["environment"]["cuda_available"]
    steps = summary["steps"]
    assert steps["build"]["result"]["cpu"]["backend"] in ("cpp", "reference")
    assert "skipped" in steps["build"]["result"]["cuda"]
    rows = {row["operation"]: row for row in steps["benchmark"]["result"]["rows"]}
    assert {"NF4+DQ quantize 256^2 bf16", "4-bit GEMV batch 1 256^2", "dense bf16 F.linear batch 8 256^2"} <= set(rows)
    assert all(row["ms"] > 0 for row in rows.values())
    layer = next(row for name, row in rows.items() if name.startswith("QLoRA layer"))
    assert layer["ratio_vs_dense"] > 0
    tests = steps["pytest"]["result"]
    assert tests["collected"] >= 140 and tests["skipped"] == tests["collected"] and tests["errors"] == 0, tests
    # every module of the CUDA test set was collected (and this CPU-only module was not)
    cases = ET.parse(tmp_path / "pytest-cuda.xml").getroot().iter("testcase")
    modules = ("quantize", "ops", "paged_optimizer", "trainer", "serving")
    assert {c.get("classname") for c in cases} == {f"tests.cuda.test_{name}" for name in modules}


def test_parse_junit_counts_outcomes_and_keeps_failure_messages(tmp_path):
    report = tmp_path / "report.xml"
    report.write_text(
        '<testsuites><testsuite name="pytest" tests="4">'
        '<testcase classname="tests.cuda.test_a" name="test_ok" time="0.5"/>'
        '<testcase classname="tests.cuda.test_a" name="test_bad" time="2.0">'
        '<failure message="assert 1 == 2">trace</failure></testcase>'
        '<testcase classname="tests.cuda.test_b" name="test_boom" time="0.1"><error message="fixture failed"/>'
        "</testcase>"
        '<testcase classname="tests.cuda.test_b" name="test_skip" time="0">'
        '<skipped message="needs a CUDA device"/></testcase>'
        "</testsuite></testsuites>"
    )
    result = parse_junit(report)
    assert {k: result[k] for k in ("collected", "passed", "failed", "errors", "skipped")} == {
        "collected": 4,
        "passed": 1,
        "failed": 1,
        "errors": 1,
        "skipped": 1,
    }
    failure = {"test": "tests.cuda.test_a::test_bad", "kind": "failure", "message": "assert 1 == 2"}
    assert result["failures"][0] == failure
    assert result["skip_reasons"] == {"needs a CUDA device": 1}
    assert result["slowest"][0] == {"test": "tests.cuda.test_a::test_bad", "s": 2.0}
