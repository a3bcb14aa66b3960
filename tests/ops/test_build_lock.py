"""A first C++ build killed with SIGKILL does not hang the next import (it used to wait forever on torch's lock)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lightning_qlora.atomic import exclusive_lock
from lightning_qlora.errors import ResourceError
from lightning_qlora.ops import _build

# generous hang guards, not timings: a build takes ~40 s on an idle 2-core machine, ~140 s on a loaded one
BUILD_GUARD_S = 900
FIRST_CALL = "from lightning_qlora.ops import backend; print(backend(), flush=True)"


def _env(root: Path) -> dict[str, str]:
    # both variables, so the same test reproduces the hang on the old loader (torch's default directory)
    return {**os.environ, _build.BUILD_DIR_ENV: str(root / "build"), "TORCH_EXTENSIONS_DIR": str(root / "torch")}


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "killpg"), reason="needs POSIX process groups")
def test_import_after_a_killed_first_build_finishes(tmp_path: Path) -> None:
    first = subprocess.Popen(
        [sys.executable, "-c", FIRST_CALL],
        env=_env(tmp_path),
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + BUILD_GUARD_S
    batons: list[Path] = []
    while not batons and first.poll() is None and time.monotonic() < deadline:
        batons = list(tmp_path.rglob("lock"))  # torch's FileBaton: the build is under way
        time.sleep(0.05)
    os.killpg(first.pid, signal.SIGKILL)  # the compiler and ninja too, as a CI timeout or the OOM killer would
    first.wait(timeout=60)
    assert batons and all(p.exists() for p in batons), "the first build did not reach torch's build lock"

    second = subprocess.run(
        [sys.executable, "-c", FIRST_CALL],
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=BUILD_GUARD_S,
        check=False,
    )
    assert second.returncode == 0, second.stderr[-3000:]
    assert second.stdout.split()[-1] == "cpp", second.stderr[-3000:]  # it rebuilt, not just fell back


def test_waiting_for_a_live_builder_says_so_and_times_out(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    lock = tmp_path / "x.lock"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\nfrom lightning_qlora.atomic import exclusive_lock\n"
            f"with exclusive_lock({str(lock)!r}, 'building'):\n    print('HELD', flush=True); time.sleep(600)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "HELD"
        with pytest.raises(ResourceError, match=rf"held by pid {holder.pid}"):
            with exclusive_lock(lock, "building the test kernels", timeout=1.0, quiet_for=0.2):
                pass
        assert f"waiting for another process building the test kernels (lock file {lock}" in caplog.text
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=60)
    with exclusive_lock(lock, "building", timeout=30):  # the dead holder's lock went with it
        pass
