"""``lightning-qlora serve adapters_dir=... [host=127.0.0.1] [port=8000] [model=smollm2] ...``.

Arguments are ``key=value`` pairs (the Hydra-style the rest of the CLI uses): every field of
:class:`~lightning_qlora.serving.api.ServerConfig` plus ``host``, ``port`` and ``log_level``.

Example:
    $ lightning-qlora serve adapters_dir=runs/adapters port=8000
    $ curl 127.0.0.1:8000/v1/chat/completions -d '{"model": "my-adapter", "messages": [...]}'
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence
from typing import Any

USAGE = "usage: lightning-qlora serve adapters_dir=DIR [host=127.0.0.1] [port=8000] [model=smollm2|tiny] " \
        "[num_pages=8192] [page_size=N] [max_batch_size=16] [max_prompt_tokens=N] [max_body_bytes=2097152] " \
        "[max_prompt_chars=131072] [max_messages=1024] [max_queue_wait_s=60] [log_level=info]"  # fmt: skip


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
                config[key] = value.lower() in ("1", "true", "yes")
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


def main(argv: Sequence[str] | None = None) -> None:
    """Start the server (blocks until interrupted)."""
    from lightning_qlora.serving.api import ServerConfig, build_server

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "serve":
        argv = argv[1:]
    config, run = parse_args(argv)
    try:
        server_config = ServerConfig(**config)
    except ValueError as error:
        raise SystemExit(f"{error}\n{USAGE}") from None
    build_server(server_config).run(host=run["host"], port=run["port"], log_level=run["log_level"],
                                    generate_client_file=False)  # fmt: skip


if __name__ == "__main__":
    main()
