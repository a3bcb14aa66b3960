"""The CPU kernels under AddressSanitizer + UndefinedBehaviorSanitizer on odd shapes."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ is needed to build the sanitizer harness")
def test_kernels_are_clean_under_asan_and_ubsan(tmp_path):
    binary = tmp_path / "harness"
    build = subprocess.run(
        [
            "g++",
            "-std=c++17",
            "-O1",
            "-g",
            "-pthread",
            "-fsanitize=address,undefined",
            "-fno-sanitize-recover=all",
            f"-I{ROOT / 'csrc' / 'include'}",
            str(ROOT / "tests" / "ops" / "sanitize_harness.cpp"),
            str(ROOT / "csrc" / "cpu" / "parallel.cpp"),
            str(ROOT / "csrc" / "cpu" / "kernels.cpp"),
            str(ROOT / "csrc" / "cpu" / "matmul.cpp"),
            "-march=native",
            "-o",
            str(binary),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    run = subprocess.run(
        [str(binary)], capture_output=True, text=True, check=False, env={"ASAN_OPTIONS": "detect_leaks=1"}
    )
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    assert "failures=0" in run.stdout
