"""Building and loading the compiled kernels: where the sources are, the flags, the cache, the lock, the warning.

Both extensions (``lightning_qlora_cpu`` from ``csrc/cpu``, ``lightning_qlora_cuda`` from
``csrc/cuda``) are built on first use with ``torch.utils.cpp_extension.load`` into
``$LIGHTNING_QLORA_BUILD_DIR`` (default ``~/.cache/lightning_qlora/build``), one directory per
extension, Python, torch and source location, so two checkouts or an installed wheel never
rebuild over each other.

A build runs under an inter-process lock (:func:`lightning_qlora.atomic.exclusive_lock`, a
``flock`` the kernel releases when its holder dies). torch's own build lock is a plain file
that a killed build leaves behind, on which every later build waits forever; holding ours,
no other build of ours can be running, so a leftover torch lock is stale and is removed. A
process that waits for another's build says so, and gives up after
``$LIGHTNING_QLORA_BUILD_TIMEOUT`` seconds (default 900) with the reference kernels.

A failed build warns once and the reference kernels run, unless
``LIGHTNING_QLORA_REQUIRE_COMPILED=1`` (CI), where the tests of the compiled kernels fail
instead of skipping. ``LIGHTNING_QLORA_FORCE_REFERENCE=1`` skips the compiled kernels.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import sys
import sysconfig
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from lightning_qlora.atomic import exclusive_lock
from lightning_qlora.errors import ResourceError

FORCE_REFERENCE_ENV = "LIGHTNING_QLORA_FORCE_REFERENCE"
REQUIRE_COMPILED_ENV = "LIGHTNING_QLORA_REQUIRE_COMPILED"
BUILD_DIR_ENV = "LIGHTNING_QLORA_BUILD_DIR"
BUILD_TIMEOUT_ENV = "LIGHTNING_QLORA_BUILD_TIMEOUT"
_PACKAGE_CSRC = Path(__file__).resolve().parents[1] / "csrc"
#: The C++/CUDA sources: inside the package (so wheels carry them); the repo's top-level csrc links here.
CSRC = _PACKAGE_CSRC if _PACKAGE_CSRC.is_dir() else Path(__file__).resolve().parents[2] / "csrc"

#: extension name -> (sources under CSRC, include dirs under CSRC, C++ flags, CUDA flags, linker flags)
EXTENSIONS: dict[str, dict[str, Any]] = {
    "lightning_qlora_cpu": {
        "sources": ["cpu/parallel.cpp", "cpu/kernels.cpp", "cpu/matmul.cpp", "cpu/bgmv.cpp", "cpu/bindings.cpp"],
        "includes": ["include"],
        "cflags": ["-O3", "-pthread", "-march=native", "-ffp-contract=off"],  # threads: cpu/parallel.h, not OpenMP
        "cuda_cflags": [],
        "ldflags": ["-pthread"],
    },
    "lightning_qlora_cuda": {
        "sources": ["cuda/bindings.cpp", "cuda/kernels.cu", "cuda/linear.cu", "cuda/bgmv.cu", "cuda/paged_memory.cu"],
        "includes": ["include", "cuda"],
        "cflags": ["-O3"],
        "cuda_cflags": ["-O3", "-fmad=false"],  # no fused multiply-adds: the CPU build (and tests) use none
        "ldflags": [],
    },
}

_loaded: dict[str, Any] = {}
_errors: dict[str, str] = {}
_timings: dict[str, float] = {}


def force_reference() -> bool:
    """Whether ``LIGHTNING_QLORA_FORCE_REFERENCE`` asks for the reference kernels only."""
    return os.environ.get(FORCE_REFERENCE_ENV, "") not in ("", "0")


def compiled_required() -> bool:
    """Whether ``LIGHTNING_QLORA_REQUIRE_COMPILED`` makes a failed build an error in the tests (CI)."""
    return os.environ.get(REQUIRE_COMPILED_ENV, "") not in ("", "0")


def build_root() -> Path:
    """``$LIGHTNING_QLORA_BUILD_DIR``, else ``$LIGHTNING_QLORA_CACHE/build``, else ``~/.cache/lightning_qlora/build``."""
    if os.environ.get(BUILD_DIR_ENV):
        return Path(os.environ[BUILD_DIR_ENV])
    root = os.environ.get("LIGHTNING_QLORA_CACHE") or Path.home() / ".cache" / "lightning_qlora"
    return Path(root) / "build"


def build_directory(name: str) -> Path:
    """The build directory of extension ``name``: one per Python, torch and source location."""
    key = f"{sys.version_info[:2]}|{torch.__version__}|{CSRC}".encode()
    return build_root() / f"{name}-py{sys.version_info[0]}{sys.version_info[1]}-{hashlib.sha256(key).hexdigest()[:12]}"


def _put_ninja_on_path() -> None:
    """cpp_extension runs ``ninja`` from PATH; a venv used without activation has it only in its bin dir."""
    if shutil.which("ninja") is not None:
        return
    for directory in (sysconfig.get_path("scripts"), str(Path(sys.executable).parent)):
        if (Path(directory) / "ninja").exists():
            os.environ["PATH"] = directory + os.pathsep + os.environ.get("PATH", "")
            return


@contextlib.contextmanager
def _first_build_notice(name: str, directory: Path) -> Iterator[None]:
    """Say (with a spinner on a terminal) that the one-time compile is running: it takes from half a minute to a few."""
    if any(directory.glob(f"{name}*.so")):  # already compiled: load() only loads it
        yield
        return
    from rich.console import Console

    console = Console(stderr=True)
    start = time.perf_counter()
    console.print(
        f"lightning_qlora: compiling the C++ kernels ({name}), once: later runs load them from {directory}",
        highlight=False,
        soft_wrap=True,
    )
    with console.status(f"compiling {name}..."):
        yield
    console.print(f"lightning_qlora: {name} compiled in {time.perf_counter() - start:.0f} s", highlight=False)


def _build(name: str) -> Any:
    spec = EXTENSIONS[name]
    sources = [CSRC / source for source in spec["sources"]]
    missing = [str(path) for path in sources if not path.is_file()]
    if missing:
        raise ResourceError(f"C++ sources not found: {', '.join(missing)} (a build of the package without csrc/).")
    from torch.utils.cpp_extension import load

    _put_ninja_on_path()
    directory = build_directory(name)
    directory.mkdir(parents=True, exist_ok=True)
    timeout = float(os.environ.get(BUILD_TIMEOUT_ENV, "900"))
    lock = exclusive_lock(directory.with_name(directory.name + ".lock"), f"building the {name} kernels", timeout)
    with lock, _first_build_notice(name, directory):
        # torch's FileBaton: a plain file a killed build leaves, on which load() would wait forever
        (directory / "lock").unlink(missing_ok=True)
        return load(
            name=name,
            sources=[str(path) for path in sources],
            extra_include_paths=[str(CSRC / include) for include in spec["includes"]],
            extra_cflags=spec["cflags"],
            extra_cuda_cflags=spec["cuda_cflags"] or None,
            extra_ldflags=spec["ldflags"],
            build_directory=str(directory),
            verbose=False,
        )


def extension(name: str) -> Any | None:
    """The compiled extension ``name`` (built on first call), or ``None`` after one warning if it cannot be built."""
    if name in _loaded:
        return _loaded[name]
    if name in _errors:
        return None
    start = time.perf_counter()
    try:
        module = _build(name)
    except Exception as error:  # noqa: BLE001 -- any build failure must leave the package usable
        _errors[name] = f"{type(error).__name__}: {error}"
        _timings[name] = time.perf_counter() - start
        warnings.warn(
            f"lightning_qlora: building the {name} kernels failed ({_errors[name][:2000]}); "
            "using the reference kernels.",
            stacklevel=3,
        )
        return None
    _timings[name] = time.perf_counter() - start
    _loaded[name] = module
    return module


def build_error(name: str) -> str | None:
    """Why extension ``name`` could not be built (after :func:`extension` returned ``None``), else ``None``."""
    return _errors.get(name)


def reset(name: str) -> None:
    """Forget a loaded or failed extension, so the next :func:`extension` call tries again."""
    _loaded.pop(name, None)
    _errors.pop(name, None)
    _timings.pop(name, None)


def build_result(name: str) -> tuple[bool, float, str | None]:
    """``(ok, seconds, error)`` of building (or loading from cache) extension ``name`` in this process."""
    ok = extension(name) is not None
    return ok, _timings.get(name, 0.0), build_error(name)
