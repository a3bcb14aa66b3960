"""``python -m lightning_qlora.bench kernels --contention N`` (issue 18): bounded busy processes, always stopped."""

from __future__ import annotations

import os
import time

import pytest

from lightning_qlora.bench import kernels
from lightning_qlora.bench.__main__ import main as bench_main
from lightning_qlora.errors import ConfigError


def test_busy_processes_run_during_the_block_and_are_stopped_after_it():
    with kernels.busy_processes(2) as processes:
        assert len(processes) == 2 and all(p.poll() is None for p in processes)
    assert all(p.poll() is not None for p in processes)


def _state(process) -> str:
    # /proc/<pid>/stat: "pid (comm) state ..."; the command name may hold spaces, the state follows the last ")"
    with open(f"/proc/{process.pid}/stat") as stat:
        return stat.read().rpartition(")")[2].split()[0]


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="reads process states from /proc")
def test_busy_processes_pause_for_the_idle_phase_and_resume_for_the_busy_one():
    with kernels.busy_processes(2) as processes:
        processes.pause()
        deadline = time.monotonic() + 10
        while any(_state(p) != "T" for p in processes) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert all(_state(p) == "T" for p in processes)  # stopped: the machine is idle
        processes.resume()
        while any(_state(p) == "T" for p in processes) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert all(_state(p) in ("R", "S") for p in processes)
        processes.pause()  # left paused: they must still be stopped at the end
    assert all(p.poll() is not None for p in processes)


def test_busy_processes_are_stopped_when_the_benchmark_fails():
    with pytest.raises(KeyboardInterrupt):
        with kernels.busy_processes(1) as processes:
            raise KeyboardInterrupt
    assert all(p.poll() is not None for p in processes)


@pytest.mark.parametrize("count", [-1, kernels.MAX_BUSY + 1, True, 1.5])
def test_an_unbounded_or_odd_count_is_refused(count):
    with pytest.raises(ConfigError, match="contention"):
        with kernels.busy_processes(count):
            pass


@pytest.mark.parametrize("argv", [["--contention", "99"], ["--size", "100"], ["--repeats", "0"]])
def test_bad_options_are_refused_before_anything_runs(argv):
    with pytest.raises(ConfigError):
        kernels.parse_args(argv)


def test_the_benchmark_prints_idle_and_contended_tables_side_by_side(capsys, monkeypatch):
    for name in ("WARMUP_CALLS", "WARMUP_SECONDS", "VISIT_WARMUP_CALLS", "VISIT_WARMUP_SECONDS"):
        monkeypatch.setattr(kernels, name, 1 if name.endswith("CALLS") else 0.0)  # the table, not the timings
    bench_main(["kernels", "--size", "128", "--repeats", "1", "--contention", "1"])
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("operation"))
    assert all(column in header for column in ("idle 1t", "idle 2t", "busy1 1t", "busy1 2t", "busy/idle"))
    for row in (
        "Linear4bit fwd batch 1",
        "plugin convert 1 Linear",
        "bnb matmul_4bit batch 1",
        "F.linear fp32 batch 1",
    ):
        assert row in out
    assert "MKL dense, the yardstick:" in out and "fair share alone" in out and "F.linear fp32 batch 1 " in out and "OpenMP wait policy" in out and "fused GEMV vs dequantize" in out


@pytest.mark.parametrize(
    ("call_seconds", "expected_calls"),
    [
        (1 / 64, 26),  # fast calls: until the 0.4 s a new load level needs to be seen (and re-chosen)
        (0.2, 8),  # until the 8 calls that cover the trial calls after a change
        (1.5, 2),  # slow calls: the 2 s cap, one call past it at most
    ],
)
def test_a_visit_warms_up_long_enough_for_the_kernels_to_see_the_new_load(monkeypatch, call_seconds, expected_calls):
    clock = [0.0]
    monkeypatch.setattr(kernels.time, "perf_counter", lambda: clock[0])
    calls = []

    def call():
        calls.append(clock[0])
        clock[0] += call_seconds

    kernels._warm_up(call, kernels.VISIT_WARMUP_CALLS, kernels.VISIT_WARMUP_SECONDS, kernels.VISIT_WARMUP_MAX_SECONDS)
    assert len(calls) == expected_calls


@pytest.mark.parametrize(
    ("busy", "threads", "cores", "floor"),
    [
        (2, 2, 2, 2.0),  # the setting on this VM: 4 runnable threads share 2 cores, the call gets 1
        (1, 2, 2, 1.5),  # 3 threads on 2 cores: the call gets 4/3 of a core
        (2, 1, 2, 1.5),  # one thread among 3: 2/3 of a core on average
        (2, 2, 16, 1.0),  # cores to spare: no slowdown by sharing
        (0, 2, 2, 1.0),  # idle
        (2, 4, 2, 1.5),  # more threads than cores: idle they shared 2 cores, busy 4/6 of them
    ],
)
def test_the_fair_share_floor_is_the_cores_a_call_loses_to_busy_neighbours(busy, threads, cores, floor):
    assert kernels.fair_share_floor(busy, threads, cores) == pytest.approx(floor)


def test_the_fair_share_floor_refuses_impossible_machines():
    with pytest.raises(ValueError, match="cores=0"):
        kernels.fair_share_floor(1, 2, 0)
