"""``limit_allocator_retention``: freed tensors give their memory back (glibc's dynamic mmap threshold pinned)."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest

from lightning_qlora.errors import ConfigError
from lightning_qlora.host_memory import MAX_THRESHOLD_BYTES, limit_allocator_retention

# The pattern of a training step: a freed mid-size mapped tensor raises glibc's threshold, then
# 4 MiB temporaries interleaved with small live tensors are freed. Prints the MiB still resident.
WORKER = """
import json, re, sys
from pathlib import Path
import torch
from lightning_qlora.host_memory import limit_allocator_retention
def rss_mib():
    return int(re.search(r"^VmRSS:\\s+(\\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1)) / 1024
applied = limit_allocator_retention() if sys.argv[1] == "limit" else None
big = torch.ones(4 << 20)  # 16 MiB, mapped; freeing it raises glibc's mmap threshold to 16 MiB
del big
base = rss_mib()
keep, temporaries = [], []
for _ in range(64):
    temporaries.append(torch.ones(1 << 20))  # 4 MiB each, 256 MiB in all
    keep.append(torch.ones(4096))  # 16 KiB, live above each temporary
del temporaries
print(json.dumps({"applied": applied, "retained_mib": rss_mib() - base}))
"""

glibc_linux = pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc", reason="glibc's allocator behaviour"
)


def _retained(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", WORKER, mode], capture_output=True, text=True, timeout=300, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@glibc_linux
def test_freed_temporaries_are_returned_to_the_system():
    default = _retained("default")
    limited = _retained("limit")
    # The control: with glibc's default behaviour the freed 256 MiB stay resident.
    assert default["retained_mib"] > 128, default
    assert limited["applied"] is True
    assert limited["retained_mib"] < 32, limited


@pytest.mark.parametrize("bad", [0, -1, MAX_THRESHOLD_BYTES + 1, 1.5, "1MiB", True])
def test_bad_threshold_is_a_config_error(bad):
    with pytest.raises(ConfigError, match="threshold_bytes"):
        limit_allocator_retention(bad)


# A step's temporaries, 1 to 23 MiB (138 MiB in all), touched and freed, 20 times: prints the page
# faults of the 20. ``release`` maps every one of them afresh (a 1 MiB mmap threshold, fixed).
REUSE_WORKER = """
import resource, sys, torch
from lightning_qlora.host_memory import limit_allocator_retention, reuse_freed_memory
applied = {"reuse": reuse_freed_memory, "release": limit_allocator_retention}.get(sys.argv[1], lambda: None)()
def step():
    held = [torch.ones((1 + (i * 7) % 24) << 18) for i in range(12)]
    held.clear()
step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    step()
print(json.dumps({"applied": applied, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""
STEP_PAGES = sum(1 + (i * 7) % 24 for i in range(12)) * (1 << 20) // 4096  # 138 MiB of 4 KiB pages


def _faults(mode: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", "import json\n" + REUSE_WORKER, mode], capture_output=True, text=True, timeout=300, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@glibc_linux
def test_reused_memory_spares_the_page_faults_of_every_step():
    release, reused, default = _faults("release"), _faults("reuse"), _faults("default")
    # The control, computed by hand: every temporary mapped afresh faults each of its pages, every step.
    assert release["applied"] is True
    assert release["faults"] >= 0.9 * 20 * STEP_PAGES, release
    assert reused["applied"] is True
    assert reused["faults"] < 0.05 * 20 * STEP_PAGES, (release, reused, default)
    # glibc's own defaults (``default``) land anywhere between the two from run to run -- 37k to 520k
    # faults measured on this VM -- so they are shown in the message above, never pinned.
