"""Where a single-stream decode step of the serving engine spends its time (torch.profiler, one table).

Run: ``python benchmarks/decode_profile.py [--threads N] [--tokens T]``. It quantizes
SmolLM2-135M-Instruct to NF4+DQ as the server does, warms the engine with one short request,
times a ``T``-token greedy request (base model, prefill included), then profiles another one and
prints the per-op table sorted by self CPU time, and the tokens per second of both.
"""

from __future__ import annotations

import lightning_qlora  # noqa: F401, I001 -- first: it sets OpenMP's spin-then-sleep (lightning_qlora._openmp)

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from lightning_qlora.models import load_smollm2
from lightning_qlora.quantization.convert import quantize_linears
from lightning_qlora.serving.api import use_server_threads
from lightning_qlora.serving.engine import GenerationEngine
from lightning_qlora.serving.sampling import SamplingParams


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rows", type=int, default=20, help="rows of the per-op table")
    args = parser.parse_args()
    use_server_threads(args.threads)  # as the server (ServerConfig.build_engine)
    model, tokenizer = load_smollm2()
    quantize_linears(model, "nf4", 64, True)
    engine = GenerationEngine(model, tokenizer, num_pages=8192, max_batch_size=8)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Write a haiku about the sea."}], add_generation_prompt=True, tokenize=False
    )

    def generate(tokens: int) -> float:
        start = time.perf_counter()
        engine.submit(prompt, None, SamplingParams(max_tokens=tokens))
        engine.run_until_idle()
        return tokens / (time.perf_counter() - start)

    generate(4)
    rate = generate(args.tokens)
    # the step calls the compiled GEMV directly (no op dispatch): label it so the profiler sees it
    runner, direct = engine.runner, engine.runner._gemv_4bit

    def labelled(*args: object) -> torch.Tensor:
        with record_function("linear_4bit GEMV (direct call)"):
            return direct(*args)

    runner._gemv_4bit = labelled
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        profiled_rate = generate(args.tokens)
    runner._gemv_4bit = direct
    print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))
    print(
        f"single stream, base, {args.tokens} tokens, {args.threads} threads: {rate:.1f} tok/s "
        f"({profiled_rate:.1f} tok/s under the profiler)"
    )


if __name__ == "__main__":
    main()
