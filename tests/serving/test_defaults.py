"""What a server started without flags runs on (threads, page pool), and the serving benchmark's
issue-16 suite: its targets, its table, and its wiring with every measurement faked (no model runs)."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

from lightning_qlora.serving.api import DEFAULT_NUM_PAGES, OpenAIAdapterSpec, ServerConfig, default_server_threads
from lightning_qlora.serving.cli import USAGE


@pytest.fixture(scope="module")
def bench(benchmark_module):
    return benchmark_module("serving")


def _cores(monkeypatch, count: int) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(count)), raising=False)


@pytest.mark.parametrize(("cores", "threads"), [(1, 1), (2, 1), (8, 7)])
def test_default_threads_leave_one_core_to_the_http_front_end(monkeypatch, cores, threads):
    _cores(monkeypatch, cores)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)  # the affinity wins: a container may allow fewer cores
    assert default_server_threads() == threads


@pytest.mark.parametrize(("cores", "threads"), [(None, 1), (1, 1), (2, 1), (8, 7)])
def test_default_threads_fall_back_to_the_cpu_count_without_an_affinity(monkeypatch, cores, threads):
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: cores)
    assert default_server_threads() == threads


@pytest.mark.parametrize(("threads", "cores", "expected"), [(None, 3, 2), (None, 1, 1), (3, 2, 3)])
def test_the_server_engine_runs_on_the_default_threads_unless_told(
    adapters_dir, monkeypatch, restore_torch_threads, threads, cores, expected
):
    _cores(monkeypatch, cores)
    torch.set_num_threads(expected + 1)  # so the assertion sees what build_engine set
    ServerConfig(adapters_dir=str(adapters_dir), model="tiny", num_pages=64, threads=threads).build_engine()
    assert torch.get_num_threads() == expected


def test_the_default_pool_holds_the_benchmark_adapters_and_is_what_usage_and_the_spec_say(adapters_dir):
    config = ServerConfig(adapters_dir=str(adapters_dir), model="tiny")
    assert config.num_pages == DEFAULT_NUM_PAGES == 32768 and config.threads is None
    assert DEFAULT_NUM_PAGES * 1536 * 4 == 192 * 2**20  # 192 MiB of SmolLM2's float32 pages of 1536 floats
    assert f"[num_pages={DEFAULT_NUM_PAGES}]" in USAGE
    assert OpenAIAdapterSpec(["base"]).limits.num_pages == DEFAULT_NUM_PAGES


def test_the_suite_checks_each_target_against_the_http_figures(bench):
    single, many, staggered = bench.TARGET_SUITE
    assert (single.clients, single.requests_per_client, single.max_tokens, single.base_only) == (1, 1, 128, True)
    assert (many.clients, many.requests_per_client, many.max_tokens, many.base_only) == (8, 4, 64, False)
    assert (staggered.clients, staggered.requests_per_client, staggered.max_tokens) == (4, 2, 16)
    assert single.target.met(50.0, 100.0) and not single.target.met(49.9, 1.0)
    assert many.target.met(79.0, 70.0) and not many.target.met(78.9, 10.0)
    assert staggered.target.met(15.0, 10.0) and not staggered.target.met(14.9, 10.0)
    rates = {"http": 60.0, "engine": 70.0, "peft": 40.0}
    assert bench.target_row(single, rates) == {
        "workload": single.label,
        "http_tok_s": 60.0,
        "engine_tok_s": 70.0,
        "peft_tok_s": 40.0,
        "http_over_peft": 1.5,
        "target": ">= 50 tok/s (2.7x 18.5)",
        "met": True,
    }
    assert bench.target_row(many, rates)["met"] is False
    assert bench.target_row(bench.Workload(2, 2, 8), rates)["met"] is None  # a workload of the CLI: no target


def test_with_a_baseline_checkout_the_suite_checks_the_multiples_of_it_too(bench):
    single, many, staggered = bench.TARGET_SUITE
    rates = {"http": 45.0, "engine": 50.0, "peft": 20.0, "baseline": 16.0}
    row = bench.target_row(single, rates)
    assert row["met"] is False and row["met_against_baseline"] is True  # 45 < 50 tok/s, but 2.81x >= 2.7x
    assert row["http_over_baseline"] == pytest.approx(45.0 / 16.0, abs=1e-3)
    assert bench.target_row(many, {**rates, "http": 47.9})["met_against_baseline"] is False  # 2.99x < 3x
    assert bench.target_row(staggered, rates)["met_against_baseline"] is None  # its target is PEFT's
    table = bench.format_target_table([row]).splitlines()
    assert "baseline checkout tok/s" in table[0] and "HTTP / baseline" in table[0]
    assert table[2].endswith("| 2.81x | met |")


def test_the_suite_table_has_one_line_per_workload_and_a_peer_column_only_with_a_peer(bench):
    rates = [{"http": 55.0, "engine": 60.0, "peft": 35.0}, {"http": 70.0, "engine": 80.0, "peft": 60.0}]
    rows = [bench.target_row(w, r) for w, r in zip(bench.TARGET_SUITE, rates)]
    table = bench.format_target_table(rows).splitlines()
    assert len(table) == 4 and "peer" not in table[0]
    assert table[2].startswith("| single stream, base, 128 tokens | 55.0 | 60.0 | 35.0 | 1.57x |")
    assert table[2].endswith("| met |") and table[3].endswith("| **NOT met** |")
    with_peer = [bench.target_row(bench.TARGET_SUITE[0], {**rates[0], "peer": 90.0})]
    table = bench.format_target_table(with_peer).splitlines()
    assert "peer tok/s" in table[0] and "| 35.0 | 90.0 | 1.57x |" in table[2]
    assert all(line.count("|") == table[0].count("|") for line in table)


def test_the_server_gets_pool_and_thread_flags_only_when_given(bench, tmp_path):
    defaults = bench.server_command(tmp_path, 8000, 8, None, None)
    assert not any(arg.startswith(("num_pages=", "threads=")) for arg in defaults)
    given = bench.server_command(tmp_path, 8000, 8, 4096, 2)
    assert "num_pages=4096" in given and "threads=2" in given and "max_batch_size=8" in given


def _fake_run(tokens: int, wall: float, pool: bool = False) -> dict:
    run = {"wall": wall, "tokens": tokens, "latencies": [wall / 2, wall]}
    stats = {"num_pages": DEFAULT_NUM_PAGES, "used_pages": 10, "occupancy": 0.001, "page_size": 1536}
    return run | ({"peak": stats, "final": {**stats, "adapter_loads": 4, "evictions": 0}} if pool else {})


def test_the_suite_runs_every_workload_on_every_side_in_one_invocation(bench, monkeypatch, tmp_path, capsys):
    import lightning_qlora.models

    calls = []
    monkeypatch.setattr(lightning_qlora.models, "load_smollm2", lambda: (torch.nn.Linear(1, 1), "tokenizer"))
    monkeypatch.setattr(bench, "make_adapters", lambda model, count, root: [f"adapter-{i}" for i in range(count)])
    monkeypatch.setattr(bench, "build_peft_model", lambda model, root, names: "peft-model")
    monkeypatch.setattr(bench, "default_server_threads", lambda: 3)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: calls.append(("threads", n)))

    def server(root, clients, max_batch, num_pages, threads):
        calls.append(("http", len(clients), clients[0][0][2], num_pages, threads))
        return _fake_run(100 * len(clients), 1.0, pool=True)

    def engine(model, tokenizer, root, clients, max_batch, num_pages):
        calls.append(("engine", len(clients), num_pages))
        return _fake_run(90, 1.0)

    def peft(model, tokenizer, clients):
        calls.append(("peft", len(clients), model))
        return _fake_run(40, 1.0)

    def peer(url, clients, pool_stats):
        calls.append(("peer", len(clients), url))
        return _fake_run(30, 1.0)

    monkeypatch.setattr(bench, "run_server_load", server)
    monkeypatch.setattr(bench, "run_engine_in_process", engine)
    monkeypatch.setattr(bench, "run_peft_baseline", peft)
    monkeypatch.setattr(bench, "drive_http_clients", peer)
    out = tmp_path / "targets.json"
    argv = ["serving.py", "--suite", "targets", "--json", str(out), "--adapters-dir", str(tmp_path / "adapters")]
    monkeypatch.setattr(sys, "argv", [*argv, "--peer", "http://127.0.0.1:9/"])
    bench.main()

    assert calls[0] == ("threads", 3)  # the benchmark process (engine in-process, PEFT) runs on the server's threads
    assert [c for c in calls if c[0] == "http"] == [
        ("http", 1, 128, None, None),  # no flags: the server's own defaults
        ("http", 8, 64, None, None),
        ("http", 4, 16, None, None),
    ]
    assert [c[0] for c in calls[1:]] == ["http", "engine", "peft", "peer"] * 3
    assert all(c[2] == DEFAULT_NUM_PAGES for c in calls if c[0] == "engine")
    assert all(c[2] == "http://127.0.0.1:9" for c in calls if c[0] == "peer")
    report = json.loads(out.read_text())
    assert report["threads"] == 3 and report["num_pages"] == DEFAULT_NUM_PAGES
    assert [row["met"] for row in report["table"]] == [True, True, True]  # 100, 800 tok/s; 400 = 10x PEFT's 40
    assert report["workloads"][1]["http"]["tok_s"] == 800.0 and report["workloads"][1]["peer"]["tokens"] == 30
    assert "pool_final" in report["workloads"][0]["http"] and "pool_final" not in report["workloads"][0]["peft"]
    printed = capsys.readouterr().out
    assert "| staggered 4 clients x 2 requests, 16 tokens | 400.0 | 90.0 | 40.0 | 30.0 | 10.00x |" in printed


def test_the_suite_refuses_flags_that_shape_a_single_workload(bench, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["serving.py", "--suite", "targets", "--max-tokens", "8"])
    with pytest.raises(SystemExit):
        bench.main()
    assert "drop --max-tokens" in capsys.readouterr().err
