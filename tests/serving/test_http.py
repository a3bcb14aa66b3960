"""The LitServe endpoint over HTTP: a server started by the test on 127.0.0.1 (tiny Llama, the test adapters)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from lightning_qlora.serving import GenerationEngine, SamplingParams

ROOT = Path(__file__).resolve().parents[2]
MAX_PROMPT_TOKENS = 200


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(adapters_dir, tmp_path_factory):
    port = _free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    with open(log, "w") as out:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "lightning_qlora.serving.cli",
                "serve",
                f"adapters_dir={adapters_dir}",
                "model=tiny",
                "host=127.0.0.1",
                f"port={port}",
                "num_pages=2048",
                f"max_prompt_tokens={MAX_PROMPT_TOKENS}",
                "log_level=warning",
            ],
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # LitServe forks workers: stop the group
        )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):  # wait for startup (model build + extension load), up to ~2 minutes
            if process.poll() is not None:
                pytest.fail(f"server exited with {process.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if requests.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            time.sleep(0.2)
        else:
            pytest.fail(f"server did not become healthy:\n{log.read_text()[-3000:]}")
        yield url
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)


def _chat(url: str, model: str, content: str, **extra) -> requests.Response:
    body = {"model": model, "messages": [{"role": "user", "content": content}], "temperature": 0, **extra}
    return requests.post(f"{url}/v1/chat/completions", json=body, timeout=60)


def test_chat_completion_matches_the_engine_in_process(server, tiny_quantized, adapters_dir):
    response = _chat(server, "r4-all", "Hi!", max_tokens=12)
    assert response.status_code == 200, response.text
    body = response.json()
    model, tokenizer, _ = tiny_quantized
    engine = GenerationEngine(model, tokenizer, adapters_dir=adapters_dir)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi!"}], add_generation_prompt=True, tokenize=False
    )
    expected = engine.submit(prompt, "r4-all", SamplingParams(max_tokens=12))
    engine.run_until_idle()
    assert body["choices"][0]["message"]["content"] == expected.text()
    assert body["model"] == "r4-all" and body["usage"]["completion_tokens"] >= 1


def test_streamed_completion_equals_the_whole_one(server):
    body = {"model": "r8-mlp", "prompt": "Once upon", "max_tokens": 16, "temperature": 0}
    whole = requests.post(f"{server}/v1/completions", json=body, timeout=60).json()["choices"][0]
    pieces = []
    with requests.post(f"{server}/v1/completions", json={**body, "stream": True}, stream=True, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith(b"data: ") and line != b"data: [DONE]":
                pieces.append(json.loads(line[6:])["choices"][0])
    assert "".join(p["text"] for p in pieces) == whole["text"]
    assert pieces[-1]["finish_reason"] == whole["finish_reason"] and len(pieces) > 1


def test_bad_requests_get_clear_4xx_and_the_server_keeps_serving(server):
    unknown = _chat(server, "no-such-adapter", "hi")
    assert unknown.status_code == 404
    assert unknown.json()["error"]["known_models"] == ["base", "r16-attn", "r2-qv", "r4-all", "r8-mlp"]
    assert "no-such-adapter" in unknown.json()["error"]["message"]
    malformed = requests.post(
        f"{server}/v1/chat/completions",
        data=b'{"model": "base", "messages": [',
        headers={"content-type": "application/json"},
        timeout=30,
    )
    assert malformed.status_code == 400 and "not valid JSON" in malformed.json()["error"]["message"]
    negative = _chat(server, "base", "hi", max_tokens=-5)
    assert negative.status_code == 400 and "max_tokens=-5" in negative.json()["error"]["message"]
    oversized = _chat(server, "r2-qv", "y" * 500)
    assert oversized.status_code == 413 and f"at most {MAX_PROMPT_TOKENS}" in oversized.json()["error"]["message"]
    no_messages = requests.post(f"{server}/v1/chat/completions", json={"model": "base"}, timeout=30)
    assert no_messages.status_code == 400 and "messages" in no_messages.json()["error"]["message"]
    ok = _chat(server, "r2-qv", "still there?", max_tokens=4)
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"] is not None


def test_client_disconnecting_mid_stream_frees_its_pages(server):
    body = {"model": "r16-attn", "prompt": "Tell me a long story", "max_tokens": 280, "temperature": 0, "stream": True}
    response = requests.post(f"{server}/v1/completions", json=body, stream=True, timeout=60)
    lines = response.iter_lines()
    next(line for line in lines if line.startswith(b"data: "))
    during = requests.get(f"{server}/v1/stats", timeout=30).json()
    assert during["kv_pages"] > 0 and during["running"] == 1
    response.close()  # hang up mid-stream
    for _ in range(300):  # the server notices the disconnect at its next write
        after = requests.get(f"{server}/v1/stats", timeout=30).json()
        if after["kv_pages"] == 0:
            break
        time.sleep(0.1)
    assert after["kv_pages"] == 0 and after["running"] == 0
    assert after["finish_reasons"].get("cancelled") == 1  # freed by the cancellation, not by finishing
    assert "r16-attn" in after["loaded_adapters"]  # unpinned but still resident (evictable)
    assert after["prefix_cache"]["misses"] + after["prefix_cache"]["hits"] >= 1  # admissions looked it up


def test_models_have_created_and_an_8_mib_body_is_refused_while_a_small_request_completes(server):
    models = requests.get(f"{server}/v1/models", timeout=30).json()["data"]
    assert all(isinstance(m["created"], int) and m["created"] > 0 for m in models)
    import threading

    small: dict = {}
    thread = threading.Thread(target=lambda: small.update(reply=_chat(server, "r2-qv", "hi", max_tokens=4)))
    thread.start()
    body = json.dumps({"model": "base", "prompt": "y" * (8 * 1024 * 1024), "max_tokens": 4}).encode()
    try:
        big = requests.post(
            f"{server}/v1/completions", data=body, headers={"content-type": "application/json"}, timeout=60
        )  # hang guard only
        assert big.status_code == 413 and "max_body_bytes" in big.json()["error"]["message"]
    except requests.ConnectionError:  # the server may answer 413 and close before the client sent it all
        pass
    thread.join(timeout=120)
    assert small["reply"].status_code == 200
    chars = requests.post(f"{server}/v1/completions", json={"model": "base", "prompt": "y" * 200_000}, timeout=60)
    assert chars.status_code == 413 and "max_prompt_chars" in chars.json()["error"]["message"]


def test_the_openai_client_lists_completes_and_streams(server):
    import openai

    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=60)
    assert {m.id for m in client.models.list()} == {"base", "r16-attn", "r2-qv", "r4-all", "r8-mlp"}
    whole = client.completions.create(model="r8-mlp", prompt="Once upon", max_tokens=8, temperature=0)
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(model="r8-mlp", prompt="Once upon", max_tokens=8, temperature=0, stream=True)
    )
    assert streamed == whole.choices[0].text
    chat = client.chat.completions.create(
        model="r4-all", messages=[{"role": "user", "content": "Hi!"}], max_tokens=6, temperature=0
    )
    assert chat.choices[0].message.content is not None and chat.usage.completion_tokens >= 1
    pieces = client.chat.completions.create(
        model="r4-all", messages=[{"role": "user", "content": "Hi!"}], max_tokens=6, temperature=0, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in pieces) == chat.choices[0].message.content
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x", max_tokens=2)


def test_default_host_is_loopback():
    import inspect

    from lightning_qlora.serving.api import AdapterServer

    assert inspect.signature(AdapterServer.run).parameters["host"].default == "127.0.0.1"


def test_a_whole_answer_leaves_the_worker_in_one_message_a_stream_in_one_per_token(adapters_dir):
    # Every token used to cross from the inference worker to the HTTP process as its own message,
    # streaming or not (~3 ms per token of a single stream on 2 cores).
    import asyncio

    from lightning_qlora.serving.api import AdapterServingAPI, ServerConfig

    api = AdapterServingAPI(ServerConfig(adapters_dir=str(adapters_dir), model="tiny", num_pages=2048))
    api.setup("cpu")
    try:
        params = SamplingParams(max_tokens=6, stop=[]).__dict__

        async def messages(stream: bool) -> list[dict]:
            payload = {"kind": "completion", "id": f"r{stream}", "model": "base", "prompt": "Hello there"}
            return [m async for m in api.predict({**payload, "params": params, "stream": stream})]

        whole, streamed = asyncio.run(messages(False)), asyncio.run(messages(True))
    finally:
        api.engine.stop()
    assert len(whole) == 1 and whole[0]["completion_tokens"] == 6 and len(streamed) > 1  # text deltas
    assert whole[0]["text"] == "".join(m["text"] for m in streamed)
    assert whole[0]["finish_reason"] == streamed[-1]["finish_reason"] == "length"
