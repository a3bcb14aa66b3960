"""Crash-safety of lightning_qlora.atomic: exceptions, KeyboardInterrupt and SIGKILL at every step.

The SIGKILL tests run the writer in a subprocess that stops at a chosen point (it prints a line
and sleeps), so the parent kills it exactly there; then the target must be the complete old or
the complete new version and no temporary may survive the next call.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lightning_qlora.atomic as atomic
from lightning_qlora.atomic import (
    atomic_directory,
    atomic_open,
    atomic_save_safetensors,
    atomic_torch_save,
    atomic_write_bytes,
    atomic_write_text,
    read_directory,
    recover_directory,
)
from lightning_qlora.errors import FileFormatError

HANG_GUARD_S = 120


@pytest.fixture(params=["anonymous", "named"])
def temp_kind(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test with O_TMPFILE temporaries (where the filesystem allows) and with named ones."""
    if request.param == "named":
        monkeypatch.setitem(atomic._ANONYMOUS_BY_DEVICE, os.stat(tmp_path).st_dev, False)
    elif not atomic._anonymous_files_work(tmp_path):
        pytest.skip("this filesystem has no O_TMPFILE + linkat")
    return request.param


def _leftovers(directory: Path) -> list[str]:
    """Hidden entries other than directory locks: temporaries, staged or backup trees."""
    return sorted(n for n in os.listdir(directory) if n.startswith(".") and not n.endswith(".lock"))


def _run_until(script: str, marker: str, env_extra: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """Start ``script`` in a fresh interpreter and return once it printed ``marker`` (it then sleeps)."""
    env = {**os.environ, **(env_extra or {})}
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.strip() == marker:
            return proc
    _, err = proc.communicate(timeout=HANG_GUARD_S)
    raise AssertionError(f"child exited ({proc.returncode}) before {marker!r}:\n{err}")


def _kill(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=HANG_GUARD_S)
    assert proc.returncode == -signal.SIGKILL


# ---------------------------------------------------------------------------------------------- files


def test_round_trips(tmp_path: Path, temp_kind: str) -> None:
    assert atomic_write_bytes(tmp_path / "b.bin", b"\x00\x01") == tmp_path / "b.bin"
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    atomic_write_text(tmp_path / "t.txt", "héllo")
    assert (tmp_path / "t.txt").read_text(encoding="utf-8") == "héllo"
    tensors = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(4, dtype=torch.bfloat16)}
    atomic_save_safetensors(tensors, tmp_path / "w.safetensors", metadata={"format": "pt"})
    loaded = load_file(tmp_path / "w.safetensors")
    assert all(torch.equal(loaded[k], tensors[k]) for k in tensors)
    atomic_torch_save({"step": 3, "w": torch.zeros(2)}, tmp_path / "c.pt")
    assert torch.load(tmp_path / "c.pt", weights_only=True)["step"] == 3
    atomic_write_bytes(tmp_path / "sub" / "dir" / "x", b"x")  # parents are created
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("exc", [RuntimeError("disk on fire"), KeyboardInterrupt()])
def test_failure_keeps_target_and_removes_temporary(tmp_path: Path, temp_kind: str, exc: BaseException) -> None:
    target = tmp_path / "model.bin"
    target.write_bytes(b"old")
    with pytest.raises(type(exc)):
        with atomic_open(target) as f:
            f.write(b"half of the new")
            raise exc
    assert target.read_bytes() == b"old"
    assert _leftovers(tmp_path) == []


def test_writing_over_a_directory_is_a_typed_error(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    with pytest.raises(FileFormatError, match="is a directory"):
        atomic_write_bytes(tmp_path / "d", b"x")


_FILE_CHILD = """
    import os, sys, time
    from pathlib import Path
    import lightning_qlora.atomic as atomic
    target = Path(os.environ["TARGET"])
    if os.environ.get("NAMED"):
        atomic._ANONYMOUS_BY_DEVICE[os.stat(target.parent).st_dev] = False
    stop = os.environ["STOP"]
    real_replace = os.replace
    def replace(src, dst):
        if stop == "replace":
            print("STOPPED", flush=True); time.sleep(600)
        real_replace(src, dst)
    os.replace = replace
    with atomic.atomic_open(target) as f:
        f.write(b"new" * 100_000)
        if stop == "write":
            print("STOPPED", flush=True); time.sleep(600)
"""


@pytest.mark.parametrize("stop", ["write", "replace"])
def test_sigkill_keeps_old_file_and_next_write_removes_temporary(tmp_path: Path, temp_kind: str, stop: str) -> None:
    target = tmp_path / "last.ckpt"
    target.write_bytes(b"old")
    env = {"TARGET": str(target), "STOP": stop, "NAMED": "1" if temp_kind == "named" else ""}
    _kill(_run_until(_FILE_CHILD, "STOPPED", env))
    assert target.read_bytes() == b"old"
    if temp_kind == "anonymous" and stop == "write":
        assert _leftovers(tmp_path) == []  # an unnamed inode dies with its writer
    # Whatever the kill left is a dead writer's temporary: the next write to the target removes it.
    atomic_write_bytes(target, b"newer")
    assert target.read_bytes() == b"newer"
    assert _leftovers(tmp_path) == []


def test_live_writers_temporaries_are_not_removed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(atomic._ANONYMOUS_BY_DEVICE, os.stat(tmp_path).st_dev, False)
    target = tmp_path / "f"
    env = {"TARGET": str(target), "STOP": "write", "NAMED": "1"}
    proc = _run_until(_FILE_CHILD, "STOPPED", env)
    try:
        live = _leftovers(tmp_path)
        assert len(live) == 1 and live[0].startswith(f".f.{proc.pid}.")
        atomic_write_bytes(target, b"mine")
        assert _leftovers(tmp_path) == live  # the other writer is alive: its temporary stays
    finally:
        _kill(proc)


# ---------------------------------------------------------------------------------------------- directories


def _fill(directory: Path, version: str) -> None:
    (directory / "adapter.safetensors").write_text(f"weights {version}")
    (directory / "adapter.json").write_text(f"config {version}")
    (directory / "nested").mkdir()
    (directory / "nested" / "extra").write_text(version)


def _version(directory: Path) -> str:
    weights = (directory / "adapter.safetensors").read_text().split()[1]
    config = (directory / "adapter.json").read_text().split()[1]
    nested = (directory / "nested" / "extra").read_text()
    assert weights == config == nested, f"mixed versions: {weights} {config} {nested}"
    return weights


def test_directory_swap_and_reader(tmp_path: Path) -> None:
    target = tmp_path / "run1"
    with atomic_directory(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".run1.tmp-") and not target.exists()
        _fill(tmp, "v1")
    with atomic_directory(target) as tmp:
        _fill(tmp, "v2")
    with read_directory(target) as d:
        assert _version(d) == "v2"
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("exc", [ValueError("bad adapter"), KeyboardInterrupt()])
def test_directory_failure_keeps_old_tree(tmp_path: Path, exc: BaseException) -> None:
    target = tmp_path / "run1"
    with atomic_directory(target) as tmp:
        _fill(tmp, "v1")
    with pytest.raises(type(exc)):
        with atomic_directory(target) as tmp:
            (tmp / "adapter.safetensors").write_text("weights v2")
            raise exc
    assert _version(target) == "v1"
    assert _leftovers(tmp_path) == []


def test_directory_over_a_file_is_a_typed_error(tmp_path: Path) -> None:
    (tmp_path / "run1").write_text("not a dir")
    with pytest.raises(FileFormatError, match="a file of that name exists"):
        with atomic_directory(tmp_path / "run1"):
            pass


_DIR_CHILD = """
    import os, shutil, sys, time
    from pathlib import Path
    import lightning_qlora.atomic as atomic
    target = Path(os.environ["TARGET"])
    stop = os.environ["STOP"]
    renames = 0
    real_rename, real_rmtree = os.rename, shutil.rmtree
    def rename(src, dst):
        global renames
        renames += 1
        if stop == f"rename{renames}":
            print("STOPPED", flush=True); time.sleep(600)
        real_rename(src, dst)
    def rmtree(path, *a, **k):
        if stop == "rmtree" and Path(path).name.endswith(".old"):
            print("STOPPED", flush=True); time.sleep(600)
        real_rmtree(path, *a, **k)
    os.rename, shutil.rmtree = rename, rmtree
    with atomic.atomic_directory(target) as tmp:
        (tmp / "adapter.safetensors").write_text("weights v2")
        if stop == "fill":
            print("STOPPED", flush=True); time.sleep(600)
        (tmp / "adapter.json").write_text("config v2")
        (tmp / "nested").mkdir()
        (tmp / "nested" / "extra").write_text("v2")
"""

# where the writer is killed -> the version a reader sees afterwards
_KILL_POINTS = {
    "fill": "v1",  # half-filled temporary: never visible
    "rename1": "v1",  # complete temporary, not yet staged
    "rename2": "v2",  # staged as .new: the swap is rolled forward
    "rename3": "v2",  # old moved aside, new not yet in place: target missing until recovered
    "rmtree": "v2",  # new in place, backup not yet removed
}


@pytest.mark.parametrize("stop", list(_KILL_POINTS))
def test_sigkill_during_directory_write_is_recovered(tmp_path: Path, stop: str) -> None:
    target = tmp_path / "run1"
    with atomic_directory(target) as tmp:
        _fill(tmp, "v1")
    _kill(_run_until(_DIR_CHILD, "STOPPED", {"TARGET": str(target), "STOP": stop}))
    with read_directory(target) as d:
        assert _version(d) == _KILL_POINTS[stop]
    assert _leftovers(tmp_path) == []
    # the next writer works as if nothing happened
    with atomic_directory(target) as tmp:
        _fill(tmp, "v3")
    assert _version(target) == "v3"
    assert _leftovers(tmp_path) == []


def test_sigkill_before_first_ever_directory_is_recovered(tmp_path: Path) -> None:
    target = tmp_path / "fresh"
    _kill(_run_until(_DIR_CHILD, "STOPPED", {"TARGET": str(target), "STOP": "rename2"}))
    assert not target.exists()  # staged only
    assert recover_directory(target) is True
    assert (target / "adapter.json").read_text() == "config v2"


def test_recover_directory_without_anything_pending(tmp_path: Path) -> None:
    assert recover_directory(tmp_path / "missing") is False
    with pytest.raises(FileNotFoundError):
        with read_directory(tmp_path / "missing"):
            pass


def test_writer_waits_for_reader(tmp_path: Path) -> None:
    target = tmp_path / "run1"
    with atomic_directory(target) as tmp:
        _fill(tmp, "v1")
    # Stop the writer once its tree is filled; it then blocks on the lock held by our reader.
    child = _DIR_CHILD.replace('if stop == "fill":', "if False:") + '\n    print("SWAPPED", flush=True)\n'
    script = child.replace(
        "    with atomic.atomic_directory(target) as tmp:",
        '    print("STOPPED", flush=True)\n    with atomic.atomic_directory(target) as tmp:',
    )
    with read_directory(target) as d:
        proc = _run_until(script, "STOPPED", {"TARGET": str(target), "STOP": "none"})
        try:
            proc.wait(timeout=3)  # long enough for an unblocked writer to finish its swap
        except subprocess.TimeoutExpired:
            pass
        assert _version(d) == "v1"  # no swap while we read
    out, err = proc.communicate(timeout=HANG_GUARD_S)
    assert proc.returncode == 0, err
    assert "SWAPPED" in out
    assert (target / "adapter.json").read_text() == "config v2"
