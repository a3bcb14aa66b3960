"""``lightning-qlora serve adapters_dir=... [host=127.0.0.1] [port=8000] [model=smollm2] ...``.

Arguments are ``key=value`` pairs (the Hydra-style the rest of the CLI uses): every field of
:class:`~lightning_qlora.serving.api.ServerConfig` plus ``host``, ``port`` and ``log_level``.

Every sub-directory of ``adapters_dir`` holding an adapter is served under its name, so the run
dir of a training run serves its ``adapter`` (and ``adapter_peft``) as they are.

The command is a small supervisor: the server and LitServe's worker processes run in a process
group of their own; SIGTERM, SIGINT and SIGHUP to the command are forwarded to that whole group,
and the command returns only once no process of the group is left (stragglers are killed after a
grace period), so the port is free when it exits. If the supervisor itself is killed, the server
gets SIGTERM from the kernel (Linux ``PR_SET_PDEATHSIG``) and stops its workers.

Example:
    $ lightning-qlora serve adapters_dir=runs/2026-12-02/14-03-11 port=8000
    $ curl 127.0.0.1:8000/v1/chat/completions -d '{"model": "adapter", "messages": [...]}'
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from types import FrameType
from typing import Any

#: set in the server process's environment by the supervisor (the user never sets it)
_SERVER_ENV = "LIGHTNING_QLORA_SERVE_CHILD"
#: seconds the server group has to stop after a forwarded signal before it is killed
GRACE_SECONDS = 15.0

USAGE = (
    "usage: lightning-qlora serve adapters_dir=DIR [host=127.0.0.1] [port=8000] [model=smollm2|tiny] "
    "[num_pages=32768] [page_size=N] [max_batch_size=16] [max_prompt_tokens=N] [max_body_bytes=2097152] "
    "[max_prompt_chars=131072] [max_messages=1024] [max_queue_wait_s=60] [threads=N (default: cores - 1)] "
    "[prefix_caching=true] [log_level=info]"
)


def parse_args(argv: Sequence[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``key=value`` strings -> (ServerConfig kwargs, run kwargs); unknown or malformed keys raise ``SystemExit``."""
    from lightning_qlora.serving.api import ServerConfig

    fields = {f.name: f for f in dataclasses.fields(ServerConfig)}
    config: dict[str, Any] = {}
    run: dict[str, Any] = {"host": "127.0.0.1", "port": 8000, "log_level": "info"}
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep:
            raise SystemExit(f"argument {arg!r} is not key=value.\n{USAGE}")
        if key in ("host", "log_level"):
            run[key] = value
        elif key == "port":
            run[key] = _int(key, value)
        elif key in fields:
            kind = str(fields[key].type)
            if "bool" in kind:
                config[key] = _bool(key, value)
            elif "float" in kind:
                config[key] = _float(key, value)
            elif "int" in kind:
                config[key] = None if value.lower() in ("none", "null") else _int(key, value)
            else:
                config[key] = value
        else:
            raise SystemExit(f"unknown argument {key!r}.\n{USAGE}")
    if "adapters_dir" not in config:
        raise SystemExit(f"adapters_dir=... is required.\n{USAGE}")
    return config, run


def _bool(key: str, value: str) -> bool:
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise SystemExit(f"{key}={value!r} must be true or false.\n{USAGE}")


def _int(key: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise SystemExit(f"{key}={value!r} must be an integer.\n{USAGE}") from None


def _float(key: str, value: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise SystemExit(f"{key}={value!r} must be a number.\n{USAGE}") from None


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a member exists (it changed its credentials)
        return True
    return True


def _signal_group(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:
        pass


def _stop_group(pgid: int, grace: float) -> None:
    """Wait up to ``grace`` s for the group to be empty, then SIGTERM and finally SIGKILL what is left."""
    for signum in (None, signal.SIGTERM, signal.SIGKILL):
        if signum is not None:
            _signal_group(pgid, signum)
        deadline = time.monotonic() + (grace if signum is None else 5.0)
        while time.monotonic() < deadline:
            if not _group_alive(pgid):
                return
            time.sleep(0.05)


def _supervise(argv: list[str]) -> int:
    """Run the server in a new process group, forward stop signals to the group, return once it is empty."""
    command = [sys.executable, "-m", "lightning_qlora.serving.cli", *argv]
    # a new session is a new process group (pgid = the server's pid) without the terminal: Ctrl+C reaches
    # this process only, which forwards it
    server = subprocess.Popen(command, env={**os.environ, _SERVER_ENV: "1"}, start_new_session=True)
    received: list[int] = []
    deadline: list[float] = []  # set by the first stop signal

    def forward(signum: int, frame: FrameType | None) -> None:
        if received:  # a second Ctrl+C: stop now
            _signal_group(server.pid, signal.SIGKILL)
            return
        received.append(signum)
        deadline.append(time.monotonic() + GRACE_SECONDS)
        _signal_group(server.pid, signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    try:
        while True:
            try:
                returncode = server.wait(timeout=0.5)
                break
            except subprocess.TimeoutExpired:
                if deadline and time.monotonic() > deadline[0]:
                    _signal_group(server.pid, signal.SIGKILL)
    finally:
        # the server is gone; its workers may not be (a crash, or an old LitServe): empty the group
        _stop_group(server.pid, grace=2.0)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return 128 + received[0] if received else returncode


def _stop_on_sigterm() -> None:
    """In the server process: SIGTERM runs LitServe's own Ctrl+C shutdown (which stops its workers)."""
    server_pid = os.getpid()

    def interrupt(signum: int, frame: FrameType | None) -> None:
        if os.getpid() != server_pid:  # a forked worker inherited this handler: die as SIGTERM asks
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGHUP, interrupt)
    if sys.platform.startswith("linux"):
        import ctypes

        try:  # the supervisor killed (SIGKILL): the kernel sends us SIGTERM
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1
        except (OSError, AttributeError):
            pass


def main(argv: Sequence[str] | None = None) -> None:
    """Start the server and block until it is stopped (Ctrl+C, SIGTERM); exits with 128 + the signal."""
    from lightning_qlora.serving.api import ServerConfig, build_server

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "serve":
        argv = argv[1:]
    config, run = parse_args(argv)
    try:
        server_config = ServerConfig(**config)
    except ValueError as error:
        raise SystemExit(f"{error}\n{USAGE}") from None
    if os.environ.get(_SERVER_ENV) != "1":
        raise SystemExit(_supervise(argv))  # bad arguments failed above, in the user's process
    _stop_on_sigterm()
    build_server(server_config).run(
        host=run["host"], port=run["port"], log_level=run["log_level"], generate_client_file=False
    )


if __name__ == "__main__":
    main()
