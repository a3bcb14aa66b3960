"""Crash-safe writes: a file or a directory is either the complete old version or the complete new one.

Every write goes to a temporary in the *target's own directory* (so the final step is a rename
on one filesystem, never a copy across filesystems), is flushed and ``fsync``-ed, and is then
moved into place with :func:`os.replace`; the directory is ``fsync``-ed so the rename itself
survives a power cut. A failure (an exception, ``KeyboardInterrupt``) removes the temporary.

What a ``SIGKILL`` leaves behind (nothing can run on ``SIGKILL``, so this is by construction):

* **Files** (:func:`atomic_write_bytes` and friends). On Linux the data is written to an
  unnamed ``O_TMPFILE`` inode: a kill while writing leaves *nothing* (the kernel frees the
  inode). Only for the two system calls between naming it and renaming it does a hidden
  ``.<name>.<pid>.<random>.tmp`` exist; where ``O_TMPFILE`` is unsupported (some network or
  overlay filesystems) that named temporary exists for the whole write. Either way the target
  keeps its previous content, and the next write to the same target removes the temporaries
  of writers that are no longer alive.
* **Directories** (:func:`atomic_directory`). The new tree is filled in a hidden sibling
  ``.<name>.tmp-<pid>-<random>``, fsynced, and then, under an inter-process lock on the hidden
  ``.<name>.lock``, swapped in by three renames::

      tmp -> .<name>.new       (the new tree is complete: from here on it wins)
      <name> -> .<name>.old    (the previous tree is kept until the new one is in place)
      .<name>.new -> <name>
      remove .<name>.old

  A kill before the first rename leaves the old tree as the target and a dead temporary;
  after it, :func:`recover_directory` (run by the next writer and by every reader that uses
  :func:`read_directory`) finishes the swap: a complete ``.new`` is moved into place, a
  leftover ``.old`` is removed (or put back if the target is somehow missing), and dead
  writers' temporaries are deleted. Readers holding :func:`read_directory` take a shared lock,
  so a writer never swaps trees in the middle of a read (which file belongs to which version
  is never mixed).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import secrets
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

import torch

from lightning_qlora.errors import FileFormatError, ResourceError

__all__ = [
    "atomic_directory",
    "atomic_open",
    "atomic_save_safetensors",
    "atomic_torch_save",
    "atomic_write_bytes",
    "atomic_write_text",
    "exclusive_lock",
    "read_directory",
    "recover_directory",
]

log = logging.getLogger(__name__)
_O_TMPFILE = getattr(os, "O_TMPFILE", 0)
_PROC_FD = Path("/proc/self/fd")
_AT_FDCWD = -100
_AT_SYMLINK_FOLLOW = 0x400
#: st_dev -> whether O_TMPFILE + linkat works on that filesystem (tmpfs/ext4/xfs yes; NFS, some FUSE no).
_ANONYMOUS_BY_DEVICE: dict[int, bool] = {}


def _fsync_directory(directory: Path) -> None:
    """Persist a directory's entries (a rename is only durable once its directory is fsynced)."""
    if sys.platform == "win32":  # directories cannot be opened for fsync there; NTFS journals renames
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    """Whether a process with this id exists (a live writer may still be filling its temporary)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return True
    return True


def _remove_dead_temporaries(target: Path) -> None:
    """Delete ``.<name>.<pid>.<random>.tmp`` files of ``target`` left by writers that were killed."""
    prefix = f".{target.name}."
    try:
        entries = list(os.scandir(target.parent))
    except FileNotFoundError:
        return
    for entry in entries:
        name = entry.name
        if not (name.startswith(prefix) and name.endswith(".tmp")):
            continue
        fields = name[len(prefix) : -len(".tmp")].split(".")
        if len(fields) != 2 or not fields[0].isdigit():
            continue
        if not _pid_alive(int(fields[0])):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)


def _temp_name(target: Path) -> Path:
    return target.parent / f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"


def _linkat_follow(src: str, dst: Path) -> None:
    """``linkat(src, dst, AT_SYMLINK_FOLLOW)``: name an ``O_TMPFILE`` inode through its /proc link.

    ``os.link`` cannot do this: on Linux it calls ``link(2)``, which does not follow the
    /proc magic link and fails with ``EXDEV``.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.linkat(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(str(dst)), _AT_SYMLINK_FOLLOW) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), src, None, str(dst))


def _anonymous_files_work(directory: Path) -> bool:
    """Whether unnamed files can be created *and later named* in ``directory`` (probed once per filesystem)."""
    if not _O_TMPFILE or not _PROC_FD.is_dir():
        return False
    device = os.stat(directory).st_dev
    if device not in _ANONYMOUS_BY_DEVICE:
        probe = directory / f".atomic-probe.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        works = True
        try:
            fd = os.open(directory, _O_TMPFILE | os.O_WRONLY, 0o644)
            try:
                _linkat_follow(str(_PROC_FD / str(fd)), probe)
            finally:
                os.close(fd)
            os.unlink(probe)
        except (OSError, AttributeError):
            works = False
        _ANONYMOUS_BY_DEVICE[device] = works
    return _ANONYMOUS_BY_DEVICE[device]


@contextlib.contextmanager
def atomic_open(path: str | Path) -> Iterator[IO[bytes]]:
    """Open a temporary next to ``path`` for binary writing; on a clean exit it replaces ``path``.

    On a clean exit the data is flushed, fsynced and renamed over ``path``; on any exception
    (``KeyboardInterrupt`` included) the temporary is removed and ``path`` is untouched.

    Example:
        >>> with atomic_open("out.bin") as f:  # doctest: +SKIP
        ...     f.write(b"payload")
    """
    target = Path(path)
    if target.is_dir():
        raise FileFormatError(f"cannot write file {str(target)!r}: it is a directory; pick a file path.")
    directory = target.parent
    directory.mkdir(parents=True, exist_ok=True)
    _remove_dead_temporaries(target)
    named: Path | None = None
    if _anonymous_files_work(directory):
        fd = os.open(directory, _O_TMPFILE | os.O_WRONLY, 0o644)
    else:
        named = _temp_name(target)
        fd = os.open(named, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    file = os.fdopen(fd, "wb")
    try:
        yield file
        file.flush()
        os.fsync(file.fileno())
        if named is None:
            # Give the finished inode a name (only now, so a kill while writing leaves nothing) ...
            named = _temp_name(target)
            _linkat_follow(str(_PROC_FD / str(fd)), named)
        file.close()
        # ... and move it over the target in one rename on this filesystem.
        os.replace(named, target)
        named = None
        _fsync_directory(directory)
    finally:
        if not file.closed:
            file.close()
        if named is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(named)


def _atomic_write_with(path: str | Path, writer: Callable[[IO[bytes]], None]) -> Path:
    with atomic_open(path) as file:
        writer(file)
    return Path(path)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see the module docstring); returns ``path``."""

    def write(file: IO[bytes]) -> None:
        file.write(data)

    return _atomic_write_with(path, write)


def atomic_write_text(path: str | Path, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically, encoded as ``encoding``; returns ``path``."""
    return atomic_write_bytes(path, text.encode(encoding))


def atomic_save_safetensors(
    tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None
) -> Path:
    """Save ``tensors`` (name -> ``torch.Tensor``) as a safetensors file atomically; returns ``path``.

    Args:
        tensors: the tensors to store; safetensors requires them contiguous and not sharing memory.
        path: the target file.
        metadata: optional string-to-string header metadata.
    """
    from safetensors.torch import save

    # safetensors' own save_file renames a temporary of its own over the path it is given,
    # so it cannot write into our temporary; serialize to bytes (one extra copy in memory).
    data = save(tensors, metadata=metadata)

    def write(file: IO[bytes]) -> None:
        file.write(data)

    return _atomic_write_with(path, write)


def atomic_torch_save(obj: object, path: str | Path) -> Path:
    """``torch.save(obj)`` to ``path`` atomically; returns ``path``."""

    def write(file: IO[bytes]) -> None:
        torch.save(obj, file)

    return _atomic_write_with(path, write)


# --------------------------------------------------------------------------------------------
# Directories
# --------------------------------------------------------------------------------------------


def _sibling(target: Path, suffix: str) -> Path:
    return target.parent / f".{target.name}.{suffix}"


@contextlib.contextmanager
def _directory_lock(target: Path, shared: bool) -> Iterator[None]:
    """An inter-process lock on ``.<name>.lock``: shared for readers, exclusive for a swap.

    ``flock`` locks are released by the kernel when their holder dies, so a killed writer never
    leaves a lock behind. Where ``fcntl`` is missing (Windows) an exclusive ``filelock`` is used.
    """
    lock_path = _sibling(target, "lock")
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        from filelock import FileLock

        with FileLock(str(lock_path)):
            yield
        return
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        if shared and err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            # A read-only location (an installed adapter) cannot be written to, so nobody swaps it.
            yield
            return
        raise
    try:
        fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the flock


def _fsync_tree(root: Path) -> None:
    """fsync every file and directory under ``root`` (bottom-up), so the renamed tree is durable."""
    if sys.platform == "win32":  # pragma: no cover
        return
    for dirpath, _dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames:
            file_path = os.path.join(dirpath, name)
            if os.path.islink(file_path):
                continue
            fd = os.open(file_path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_directory(Path(dirpath))


def _dead_directory_temporaries(target: Path) -> list[str]:
    """Paths of ``.<name>.tmp-<pid>-<random>`` trees whose writer process is gone."""
    prefix = f".{target.name}.tmp-"
    try:
        entries = list(os.scandir(target.parent))
    except FileNotFoundError:
        return []
    dead = []
    for entry in entries:
        if not entry.name.startswith(prefix):
            continue
        pid_text = entry.name[len(prefix) :].split("-", 1)[0]
        if pid_text.isdigit() and not _pid_alive(int(pid_text)):
            dead.append(entry.path)
    return dead


def _finish_swap(target: Path) -> None:
    """Bring a directory interrupted at any point of the swap to a complete state (lock held)."""
    new, old = _sibling(target, "new"), _sibling(target, "old")
    if new.exists():
        # The new tree was complete when it got this name: finish moving it in.
        if target.exists():
            if old.exists():
                shutil.rmtree(old)
            os.rename(target, old)
        os.rename(new, target)
        _fsync_directory(target.parent)
    if old.exists():
        if target.exists():
            shutil.rmtree(old)
        else:  # the target vanished (deleted by hand?) but its last complete version survives
            os.rename(old, target)
        _fsync_directory(target.parent)
    for path in _dead_directory_temporaries(target):
        shutil.rmtree(path, ignore_errors=True)


def _needs_recovery(target: Path) -> bool:
    return (
        _sibling(target, "new").exists()
        or _sibling(target, "old").exists()
        or bool(_dead_directory_temporaries(target))
    )


def recover_directory(target: str | Path) -> bool:
    """Finish or undo a directory swap a killed writer left half done; returns whether ``target`` exists.

    Also deletes the temporaries of writers killed while filling them. Cheap when nothing is
    pending (two ``stat`` calls and one listing of the parent directory). Safe to call from many processes at once:
    the repair runs under the exclusive lock, so it never races a live writer.
    """
    target = Path(target)
    if _needs_recovery(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        with _directory_lock(target, shared=False):
            _finish_swap(target)
    return target.is_dir()


@contextlib.contextmanager
def read_directory(target: str | Path) -> Iterator[Path]:
    """Hold ``target`` stable while reading it: recover a half-done swap, then take the shared lock.

    Inside the ``with`` block no writer can swap the directory, so every file read belongs to
    the same version. Raises :class:`FileNotFoundError` when there is no such directory.

    Example:
        >>> with read_directory("adapters/run1") as d:  # doctest: +SKIP
        ...     config = (d / "adapter.json").read_text()
    """
    target = Path(target)
    recover_directory(target)
    if not target.parent.is_dir():
        raise FileNotFoundError(errno.ENOENT, "no such directory", str(target))
    with _directory_lock(target, shared=True):
        # A writer killed between our recovery and our lock leaves ``target`` a complete version
        # (old or new) until the next exclusive holder finishes the swap, so reading it is safe.
        if not target.is_dir():
            raise FileNotFoundError(errno.ENOENT, "no such directory", str(target))
        yield target


@contextlib.contextmanager
def atomic_directory(target: str | Path) -> Iterator[Path]:
    """Yield a fresh hidden sibling directory to fill; on a clean exit it becomes ``target``.

    A reader sees the complete old tree or the complete new one, never a mix or a partial
    tree (see the module docstring for what a kill at each point leaves and how it is
    recovered). On an exception the temporary directory is removed and ``target`` untouched.

    Example:
        >>> with atomic_directory("adapters/run1") as tmp:  # doctest: +SKIP
        ...     atomic_save_safetensors(weights, tmp / "adapter.safetensors")
        ...     (tmp / "adapter.json").write_text(config_json)
    """
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise FileFormatError(
            f"cannot write directory {str(target)!r}: a file of that name exists; remove it or pick another path."
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)
        with _directory_lock(target, shared=False):
            _finish_swap(target)  # complete whatever a killed writer left, so names below are free
            new, old = _sibling(target, "new"), _sibling(target, "old")
            os.rename(tmp, new)
            _fsync_directory(target.parent)
            if target.exists():
                os.rename(target, old)
            os.rename(new, target)
            _fsync_directory(target.parent)
            if old.exists():
                shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# Locks between processes
# --------------------------------------------------------------------------------------------


def _holder_description(holder_file: Path) -> str:
    try:
        pid = int(holder_file.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return ""
    return f", held by pid {pid}" if _pid_alive(pid) else ""


@contextlib.contextmanager
def exclusive_lock(
    path: str | Path, purpose: str, timeout: float | None = None, quiet_for: float = 2.0
) -> Iterator[None]:
    """Hold an inter-process exclusive lock on the file ``path`` while ``purpose`` runs.

    The lock is a ``flock`` (``filelock``), which the kernel releases when its holder dies, so a
    killed holder never leaves a stale lock behind. A process that has waited ``quiet_for``
    seconds logs one warning naming the lock file, what it waits for and the holder's pid.

    Args:
        path: the lock file (created; left in place, since deleting a lock file races other lockers).
        purpose: what the holder does, for the messages (``"building the C++ kernels"``).
        timeout: seconds to wait in all before raising :class:`~lightning_qlora.errors.ResourceError`
            (``None``: wait as long as the holder lives).
        quiet_for: seconds of silent waiting before the warning.

    Raises:
        ResourceError: the lock was still held after ``timeout`` seconds.
    """
    from filelock import FileLock, Timeout

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    holder_file = path.with_name(path.name + ".holder")
    lock = FileLock(str(path))
    start = time.monotonic()
    try:
        lock.acquire(timeout=quiet_for if timeout is None else min(quiet_for, timeout))
    except Timeout:
        log.warning(
            "lightning_qlora: waiting for another process %s (lock file %s%s)%s",
            purpose,
            path,
            _holder_description(holder_file),
            "" if timeout is None else f"; giving up after {timeout:.0f} s",
        )
        remaining = -1.0 if timeout is None else max(0.0, timeout - (time.monotonic() - start))
        try:
            lock.acquire(timeout=remaining)
        except Timeout:
            raise ResourceError(
                f"another process has been {purpose} for more than {timeout:.0f} s (lock file {path}"
                f"{_holder_description(holder_file)}); wait for it, or stop it, or raise the timeout."
            ) from None
    try:
        with contextlib.suppress(OSError):
            holder_file.write_text(f"{os.getpid()}\n")
        yield
    finally:
        with contextlib.suppress(OSError):
            holder_file.unlink()
        lock.release()
