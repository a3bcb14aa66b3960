"""The CPU kernels' parallel loops (issue 18): same bits at every thread count, from many threads, after fork.

Also the C++ blockwise 8-bit pair (double quantization) against the reference kernels, and the
OpenMP wait policy lightning_qlora sets before torch loads.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest
import torch

from lightning_qlora.ops import _extension, op, reference
from lightning_qlora.ops._build import compiled_required
from lightning_qlora.quantization import get_codebook


@pytest.fixture(scope="module")
def extension():
    ext = _extension.cpu_extension()
    if ext is None:
        if compiled_required():
            pytest.fail("the compiled CPU kernels did not build")
        pytest.skip("compiled CPU kernels unavailable")
    return ext


@pytest.fixture()
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _outputs(w: torch.Tensor, x: torch.Tensor) -> list[torch.Tensor]:
    code = get_codebook("nf4")
    packed, absmax = op("quantize_4bit")(w, code, 64)
    shape = list(w.shape)
    return [
        packed,
        absmax,
        op("dequantize_4bit")(packed, absmax, code, 64, shape, torch.bfloat16),
        op("linear_4bit")(x, packed, absmax, code, 64, shape),
        op("linear_4bit_input_grad")(
            torch.randn(3, shape[0], generator=torch.Generator().manual_seed(1)), packed, absmax, code, 64, shape
        ),
    ]


def test_every_thread_count_gives_the_same_bits_as_the_reference(extension, restore_threads):
    torch.manual_seed(0)
    w, x = torch.randn(1000, 512), torch.randn(5, 512)
    code = get_codebook("nf4")
    expected_packed, expected_absmax = reference.quantize_4bit(w, code, 64)
    results = []
    for threads in (1, 2, 3, 4):
        torch.set_num_threads(threads)
        for _ in range(3):  # the loops pick their thread count by measurement: run each choice
            results.append(_outputs(w, x))
    assert torch.equal(results[0][0], expected_packed) and torch.equal(results[0][1], expected_absmax)
    for result in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(result, results[0]))


def test_kernels_called_from_many_threads_at_once_are_correct(extension):
    torch.manual_seed(0)
    w, x = torch.randn(700, 256), torch.randn(2, 256)
    expected = _outputs(w, x)
    failures: list[str] = []

    def work() -> None:
        for _ in range(10):
            if not all(torch.equal(a, b) for a, b in zip(_outputs(w, x), expected)):
                failures.append("mismatch")

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not any(thread.is_alive() for thread in threads), "a concurrent kernel call hung"
    assert failures == []


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_runs_the_kernels_after_the_parent_did(extension):
    torch.manual_seed(0)
    w, x = torch.randn(512, 512), torch.randn(1, 512)
    expected = _outputs(w, x)  # the parent's loops (and threads) are up
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child, set up as torch's DataLoader sets up its workers
        # One thread, as DataLoader workers run (GNU OpenMP, torch's intra-op pool, cannot start a
        # parallel region in a child forked after the parent used one; our own pool starts afresh).
        torch.set_num_threads(1)
        ok = all(torch.equal(a, b) for a, b in zip(_outputs(w, x), expected))
        os.write(write, b"1" if ok else b"0")
        os._exit(0)
    os.close(write)
    import select

    ready, _, _ = select.select([read], [], [], 300)
    assert ready, "the forked child hung in a kernel"
    assert os.read(read, 1) == b"1"
    os.waitpid(pid, 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("n", "blocksize"), [(262144, 256), (1000, 64), (37, 4096), (5000, 32)])
def test_the_compiled_8bit_pair_is_bit_exact_with_the_reference(extension, dtype, n, blocksize):
    assert hasattr(extension, "quantize_blockwise_8bit") and hasattr(extension, "dequantize_blockwise_8bit")
    torch.manual_seed(n)
    code = get_codebook("dynamic8")
    x = torch.randn(n)
    if n > 2 * blocksize:
        x[3] = float("nan")  # a NaN block stays visibly broken, as in the reference
        x[blocksize + 1 : 2 * blocksize + 1] = 0  # an all-zero block
    x = x.to(dtype)
    codes, absmax = op("quantize_blockwise_8bit")(x, code, blocksize)
    expected_codes, expected_absmax = reference.quantize_blockwise_8bit(x, code, blocksize)
    assert torch.equal(codes, expected_codes)
    assert torch.equal(absmax.nan_to_num(-1.0), expected_absmax.nan_to_num(-1.0))
    for out in (torch.float32, torch.bfloat16):
        for offset in (None, torch.tensor(0.3712)):  # the offset a double-quantized absmax decodes with
            got = op("dequantize_blockwise_8bit")(codes, absmax, code, blocksize, out, offset)
            want = reference.dequantize_blockwise_8bit(codes, absmax, code, blocksize, out, offset)
            assert got.dtype == out and torch.equal(got.nan_to_num(-1.0), want.nan_to_num(-1.0))


def _policy(code: str, env: dict[str, str]) -> str:
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    done = subprocess.run(
        [sys.executable, "-c", code], env={**clean, **env}, capture_output=True, text=True, timeout=300, check=True
    )
    return done.stdout.strip()


def test_importing_lightning_qlora_first_makes_openmp_threads_spin_briefly_then_sleep():
    show = (
        "import os; from lightning_qlora import _openmp; "
        "print(os.environ.get('OMP_WAIT_POLICY'), os.environ.get('GOMP_SPINCOUNT'), _openmp.SET_BY_US)"
    )
    assert _policy("import lightning_qlora; " + show, {}) == "None 2000 True"
    assert _policy("import torch, lightning_qlora; " + show, {}) == "None None False"  # too late: says so
    assert _policy("import lightning_qlora; " + show, {"OMP_WAIT_POLICY": "PASSIVE"}) == "PASSIVE None False"
    assert _policy("import lightning_qlora; " + show, {"GOMP_SPINCOUNT": "0"}) == "None 0 False"


_TEAM_WORK = """
import time, torch
import lightning_qlora
from lightning_qlora.ops import _extension, op
from lightning_qlora.quantization import get_codebook
torch.set_num_threads(2)
ext = _extension.cpu_extension()
w, code = torch.randn(2048, 2048, generator=torch.Generator().manual_seed(0)), get_codebook("nf4")
chunks, cpu, own = ext.helper_chunks(), time.process_time(), time.thread_time()
deadline = time.monotonic() + 60
# The loop site tries a team in its first calls and re-probes one at least every 64 calls, even
# when one thread wins (a busy machine); keep calling until a helper has run a chunk.
while time.monotonic() < deadline:
    op("quantize_4bit")(w, code, 64)
    other = (time.process_time() - cpu) - (time.thread_time() - own)
    if ext.helper_chunks() > chunks and other > 0.0:
        break
print(ext.helper_chunks() - chunks, other)
"""


def test_two_threads_run_chunks_on_a_second_thread(extension):
    # The loops ran their team in torch's pool through an inline at::parallel_for whose OpenMP
    # pragma the extension (built without -fopenmp) dropped: every chunk ran in the caller, and
    # 2 threads were never faster than 1. Now a helper thread claims chunks and spends CPU on them.
    done = subprocess.run([sys.executable, "-c", _TEAM_WORK], capture_output=True, text=True, timeout=300, check=True)
    helper_chunks, other_threads_cpu = done.stdout.split()
    assert int(helper_chunks) > 0
    assert float(other_threads_cpu) > 0.0


def _choices(extension, team_ms, single_ms, levels=None):
    levels = levels or [0] * len(team_ms)
    return extension.simulate_thread_choice(team_ms, single_ms, levels)


def test_a_loop_site_drops_a_team_that_turns_slow_and_takes_it_back_when_it_is_fast_again(extension):
    """Contention comes and goes (and shows in the machine's load): the choice follows within a few calls (issue 18)."""
    idle, busy = [1.0] * 40, [3.0] * 40  # a team: 1 ms idle, 3 ms while another process holds its second core
    picks = _choices(extension, idle + busy + idle, [2.0] * 120, [0] * 40 + [4] * 40 + [0] * 40)
    assert picks[4:40].count(2) >= 30  # idle: the team, bar the probes of one thread
    assert picks[44:80].count(1) >= 30  # busy: one thread after re-measuring both (4 calls)
    assert picks[84:120].count(2) >= 30  # idle again: the team back after re-measuring


def test_without_a_load_signal_a_faster_team_is_found_by_the_next_probe(extension):
    """One thread's own time does not move when the team's second core frees up: the backed-off probe finds it."""
    team = [3.0] * 80 + [1.0] * 60
    picks = _choices(extension, team, [2.0] * 140)
    assert picks[10:80].count(1) >= 60  # busy: one thread, probes backing off
    assert picks[80 + 32 + 8 :].count(2) >= 15  # the team again within the longest probe interval (32 calls)


def test_a_change_of_machine_load_remeasures_both_choices_at_once(extension):
    """At a change of the load level both choices are measured again right away, then the cheaper one runs."""
    team = [1.0] * 20 + [3.0] * 20
    picks = _choices(extension, team, [2.0] * 40, [0] * 20 + [4] * 20)
    assert picks[20:24].count(1) == 2 and picks[20:24].count(2) == 2  # both, twice, right at the change
    assert picks[24:40].count(1) >= 12  # then one thread, bar the probes of the team


def test_a_team_only_as_fast_as_one_thread_is_not_taken(extension):
    """A memory-bound loop: a second thread adds nothing, so one thread runs (no waiting for a helper)."""
    picks = _choices(extension, [1.0] * 60, [1.02] * 60)
    assert picks[8:].count(1) >= len(picks[8:]) - 8  # one thread, bar the probes


def test_one_slow_call_is_not_a_new_machine(extension):
    """A single preempted call (10x slower) neither forgets the records nor switches the choice."""
    team = [1.0] * 30
    team[15] = 10.0
    picks = _choices(extension, team, [2.0] * 30)
    assert picks[16:30].count(2) >= 12


def test_our_kernels_can_use_more_threads_than_torch():
    """set_kernel_threads: a team of 2 runs chunks on a helper while torch stays on one thread."""
    code = """
import time, torch
import lightning_qlora
from lightning_qlora.ops import _extension, op, set_kernel_threads
from lightning_qlora.quantization import get_codebook
torch.set_num_threads(1)
ext = _extension.cpu_extension()
w, code = torch.randn(2048, 2048, generator=torch.Generator().manual_seed(0)), get_codebook("nf4")
def helper_ran(seconds):
    chunks, deadline = ext.helper_chunks(), time.monotonic() + seconds
    while time.monotonic() < deadline:
        op("quantize_4bit")(w, code, 64)
        if ext.helper_chunks() > chunks:
            return True
    return False
alone = helper_ran(2)
set_kernel_threads(2)
print(alone, helper_ran(60), torch.get_num_threads())
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert done.stdout.split() == ["False", "True", "1"]
    with pytest.raises(ValueError, match="threads=-1"):
        from lightning_qlora.ops import set_kernel_threads

        set_kernel_threads(-1)


def test_beside_busy_processes_a_team_must_be_clearly_cheaper(extension):
    """A team 10% cheaper runs on an idle machine; while other processes run (load level > 0) one thread does."""
    idle = _choices(extension, [0.9] * 40, [1.0] * 40, [0] * 40)
    busy = _choices(extension, [0.9] * 40, [1.0] * 40, [4] * 40)
    assert idle[8:].count(2) >= 28 and busy[8:].count(1) >= 28


_LOAD_LEVEL = """
import subprocess, sys, time, torch
import lightning_qlora
from lightning_qlora.ops import _extension
ext = _extension.cpu_extension()
def settle(seconds):
    end, level = time.monotonic() + seconds, None
    while time.monotonic() < end:
        level = ext.machine_load_level()
        time.sleep(0.02)
    return level
before = settle(0.5)
torch.set_num_threads(2)
a = torch.randn(1024, 1024)
end, own = time.monotonic() + 1.0, 0
while time.monotonic() < end:  # this process busy on both cores: not "other processes"
    a @ a
    own = max(own, ext.machine_load_level())
busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
try:
    deadline, other = time.monotonic() + 30, 0
    while time.monotonic() < deadline and other == 0:
        other = ext.machine_load_level()
        time.sleep(0.02)
finally:
    for p in busy:
        p.kill()
print(before, own, other)
"""


def test_the_load_level_counts_other_processes_not_this_one():
    """Two spinning processes raise it; this process computing on every core does not (issue 18)."""
    done = subprocess.run([sys.executable, "-c", _LOAD_LEVEL], capture_output=True, text=True, timeout=300, check=True)
    before, own, other = (int(v) for v in done.stdout.split())
    assert other > 0
    if before == 0:  # an idle test machine: our own work must not look like contention
        assert own <= 1
