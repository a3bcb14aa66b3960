"""``lightning-qlora serve`` stops when its PID gets SIGTERM: the port is free and no process it started survives.

The server serves the run dir of a real (tiny-model) training run, as the README tells a user to.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from lightning_qlora.train import run
from tests.test_train import SMOKE, _compose

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process table from /proc")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stat(pid: int) -> tuple[str, int, int] | None:
    """``(state, ppid, pgid)`` of a live process, None if it is gone (or a zombie: it holds nothing)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None if fields[0] in ("Z", "X") else (fields[0], int(fields[1]), int(fields[2]))


def _descendants(root: int) -> set[int]:
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _stat(int(entry.name))) is not None:
            parents[int(entry.name)] = stat[1]
    found, frontier = set(), {root}
    while frontier:
        frontier = {pid for pid, ppid in parents.items() if ppid in frontier} - found
        found |= frontier
    return found


def _group_members(pgids: set[int]) -> list[int]:
    return [
        int(e.name)
        for e in Path("/proc").iterdir()
        if e.name.isdigit() and (stat := _stat(int(e.name))) is not None and stat[2] in pgids
    ]


def _port_refuses(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(2)
        return s.connect_ex(("127.0.0.1", port)) != 0


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_to_serve_frees_the_port_and_leaves_no_child(tmp_path, signum):
    run_dir = tmp_path / "run"
    run(_compose([*SMOKE, "trainer.max_steps=1", "evaluate.before=false", "evaluate.after=false"], run_dir))
    port = _free_port()
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        # the console command's module, started as a user's shell would: not in a session of its own
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "lightning_qlora.cli",
                "serve",
                f"adapters_dir={run_dir}",
                "model=tiny",
                f"port={port}",
                "num_pages=512",
                "log_level=warning",
            ],
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    started: set[int] = set()
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(900):  # startup: model build + extension load, up to ~3 minutes on a busy machine
            if process.poll() is not None:
                pytest.fail(f"serve exited with {process.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if requests.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            time.sleep(0.2)
        else:
            pytest.fail(f"serve did not become healthy:\n{log.read_text()[-3000:]}")
        models = {m["id"] for m in requests.get(f"{url}/v1/models", timeout=30).json()["data"]}
        assert {"base", "adapter", "adapter_peft"} <= models  # the run dir's adapter, in both formats
        answer = requests.post(
            f"{url}/v1/chat/completions",
            timeout=120,
            json={"model": "adapter", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
        )
        assert answer.status_code == 200, answer.text

        started = _descendants(process.pid)
        assert started, "the server runs its workers in child processes"
        groups = {stat[2] for pid in started if (stat := _stat(pid)) is not None}
        assert os.getpgid(process.pid) not in groups  # the workers are in a group of their own

        process.send_signal(signum)
        assert process.wait(timeout=90) == 128 + signum, log.read_text()[-3000:]
        assert _port_refuses(port)
        assert not [pid for pid in started if _stat(pid) is not None], log.read_text()[-3000:]
        assert not _group_members(groups)  # nothing else joined the group later either
    finally:
        for pid in started | {process.pid}:  # never leave a server behind, whatever failed
            if _stat(pid) is not None:
                os.kill(pid, signal.SIGKILL)
        process.wait(timeout=30)
