"""The Hydra app: compose an experiment from ``conf/``, fine-tune with QLoRA, evaluate before and after.

Run ``lightning-qlora`` (or ``python -m lightning_qlora.train``) for the embedded default --
SmolLM2-135M-Instruct quantized to NF4-DQ with LoRA on every linear layer, fine-tuned on the
shipped ISO-date task on the CPU -- or override any part::

    lightning-qlora adapter=dora quant=nf4 trainer.max_steps=300
    lightning-qlora -m adapter=lora,dora,vera adapter.r=4,8        # a 6-job sweep
    lightning-qlora logger=wandb                                   # W&B, offline by default
    lightning-qlora experiment=smoke                               # seconds, tiny in-memory model

Everything is built from the config before the model is loaded, so a typo or a bad value
fails in seconds. The run prints and writes (``results.json`` in the run dir) the test
exact match and loss before and after fine-tuning, time, peak memory, trainable parameters
and adapter size; ``predictions.jsonl`` (prompt, expected, base and tuned answer of every test
example), ``loss_curves.png`` and the adapter (``adapter/``, plus ``adapter_peft/`` where PEFT has
the method) land in the run dir too; the run dir is printed in full with the list of its files.
"""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.utilities import rank_zero_info
from omegaconf import DictConfig, OmegaConf

from lightning_qlora.adapters import AdapterConfigError, save_adapters
from lightning_qlora.adapters.io import export_peft
from lightning_qlora.adapters.summary import trainable_parameter_count
from lightning_qlora.app.report import PREDICTIONS_FILE, list_run_files, print_report, write_predictions
from lightning_qlora.atomic import atomic_write_text
from lightning_qlora.data import DatasetNotFoundError, evaluate_instruction_model, task_paths
from lightning_qlora.errors import ConfigError
from lightning_qlora.host_memory import limit_allocator_retention, reuse_freed_memory
from lightning_qlora.module import QLoRAModule
from lightning_qlora.plugins import NF4Precision
from lightning_qlora.plugins.atomic_checkpoint_io import install_atomic_checkpoint_io

CONFIG_DIR = str(Path(__file__).resolve().parent / "conf")

if not OmegaConf.has_resolver("task_path"):
    # ${task_path:iso_dates,train} -> the JSONL shipped in the package (works from an installed wheel)
    OmegaConf.register_new_resolver("task_path", lambda task, split: str(task_paths(task)[f"{split}_path"]))


def _build(node: Any, **kwargs: Any) -> Any:
    """``instantiate``, but our own typed errors (bad adapter values...) surface as themselves."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as error:
        if isinstance(error.__cause__, (ValueError, TypeError, FileNotFoundError)):
            raise error.__cause__ from None
        raise


def _check_data_paths(data_cfg: DictConfig) -> None:
    for key in ("train_path", "val_path", "test_path"):
        value = data_cfg.get(key)
        for path in [value] if isinstance(value, str) else list(value or []):
            if not Path(path).is_file():
                raise DatasetNotFoundError(
                    f"data.{key}: {path} does not exist; pass an existing JSONL file "
                    f"(data.{key}=/path/to/file.jsonl) or use data=iso_dates."
                )


def _resolve_ckpt_path(ckpt_path: str | None, run_dir: Path) -> str | None:
    if ckpt_path != "last":
        return ckpt_path
    last = run_dir / "checkpoints" / "last.ckpt"
    if not last.is_file():
        raise FileNotFoundError(
            f"ckpt_path=last but {last} does not exist; resume with hydra.run.dir=<the old run dir>."
        )
    return str(last)


def _resumed_logger_kwargs(node: DictConfig, ckpt_path: str | None, run_dir: Path) -> dict[str, Any]:
    """Arguments that make a logger continue the run's history when it resumes from ``ckpt_path``.

    (The CSV logger, ``ContinuingCSVLogger``, needs none.) TensorBoard drops the events an interrupted
    run wrote after its checkpoint (``purge_step``); W&B reopens the run it logged to (same id).
    """
    target = str(node.get("_target_", ""))
    if ckpt_path is None:
        return {}
    if target.endswith("TensorBoardLogger"):
        step = torch.load(ckpt_path, map_location="cpu", weights_only=True).get("global_step", 0)
        return {"purge_step": int(step)}  # steps are logged 0-based: the resumed run logs from `step` on
    if target.endswith("WandbLogger"):
        latest = Path(str(node.get("save_dir") or run_dir)) / "wandb" / "latest-run"
        if latest.exists():  # run-<time>-<id> or offline-run-<time>-<id>
            return {"id": latest.resolve().name.rsplit("-", 1)[-1], "resume": "allow"}
    return {}


def _evaluated_examples(examples: list[Any], cfg: DictConfig) -> list[Any]:
    limit = cfg.evaluate.limit
    return examples[:limit] if limit else examples


def _evaluate(module: QLoRAModule, tokenizer: Any, examples: list[Any], cfg: DictConfig, label: str) -> dict[str, Any]:
    start = time.perf_counter()
    result = evaluate_instruction_model(
        module.model,
        tokenizer,
        _evaluated_examples(examples, cfg),
        batch_size=cfg.evaluate.batch_size,
        max_new_tokens=cfg.evaluate.max_new_tokens,
        max_length=cfg.data.get("max_length"),
    )
    result["seconds"] = time.perf_counter() - start
    rank_zero_info(
        f"{label}: exact match {100 * result['exact_match']:.1f}% on {result['num_examples']} test examples "
        f"({result['generated']} answered by generation, the rest read off the loss pass), "
        f"answer loss {result['loss']:.4f} ({result['seconds']:.1f} s)"
    )
    return result


def _write_predictions(
    results: dict[str, Any], examples: list[Any], cfg: DictConfig, run_dir: Path
) -> list[dict[str, Any]]:
    base, tuned = results.get("before"), results.get("after")
    if not (base or tuned):
        return []
    return write_predictions(
        run_dir / PREDICTIONS_FILE,
        _evaluated_examples(examples, cfg),
        base["predictions"] if base else None,
        tuned["predictions"] if tuned else None,
    )


def _save_adapter(module: QLoRAModule, run_dir: Path) -> dict[str, Any]:
    directory = save_adapters(module.model, run_dir / "adapter")
    saved = {"adapter_dir": str(directory), "adapter_bytes": sum(p.stat().st_size for p in directory.iterdir())}
    try:
        saved["peft_dir"] = str(export_peft(module.model, run_dir / "adapter_peft"))
    except AdapterConfigError as error:  # methods PEFT has no equivalent for
        rank_zero_info(f"adapter not exported to PEFT's format: {error}")
    return saved


def _log_adapter_artifact(trainer: L.Trainer, directory: str) -> None:
    for logger in trainer.loggers:
        if type(logger).__name__ == "WandbLogger":
            import wandb

            artifact = wandb.Artifact(name=f"adapter-{logger.experiment.id}", type="model")
            artifact.add_dir(directory)
            logger.experiment.log_artifact(artifact)


def _finish_wandb_runs(trainer: L.Trainer) -> None:
    """End the W&B runs this job started: the next ``run`` in this process (a Hydra multirun job, a test)
    would otherwise log into this one instead of starting (or resuming) its own."""
    for logger in trainer.loggers:
        if type(logger).__name__ == "WandbLogger" and getattr(logger, "_experiment", None) is not None:
            logger.experiment.finish()


#: ``host_memory`` settings: what each does to the process's allocator (lightning_qlora.host_memory)
HOST_MEMORY = {"reuse": reuse_freed_memory, "release": limit_allocator_retention, "glibc": None}


def _set_host_memory(mode: str) -> None:
    if mode not in HOST_MEMORY:
        raise ConfigError(f"host_memory={mode!r} is not one of {', '.join(HOST_MEMORY)} (see conf/train.yaml).")
    setting = HOST_MEMORY[mode]
    if setting is not None:
        setting()


def run(cfg: DictConfig) -> dict[str, Any]:
    """Build everything ``cfg`` describes, evaluate, train, evaluate, save; returns the results."""
    start = time.perf_counter()
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    L.seed_everything(cfg.seed, workers=True)
    # everything that can be wrong in the config fails here, before the (slow) model load
    _set_host_memory(cfg.get("host_memory", "reuse"))
    _check_data_paths(cfg.data)
    adapter = _build(cfg.adapter)
    plugin = NF4Precision(
        mode=cfg.quant.mode,
        blocksize=cfg.quant.blocksize,
        compute_dtype=cfg.compute_dtype,
        adapter=adapter,
        target_modules=cfg.target_modules,
        skip_modules=tuple(cfg.skip_modules),
        adaptive_threads=cfg.get("adaptive_threads", False),
    )
    optimizer = _build(cfg.optimizer)
    scheduler = _build(cfg.scheduler) if cfg.get("scheduler") else None  # scheduler=constant: {}
    callbacks = [_build(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    ckpt_path = _resolve_ckpt_path(cfg.ckpt_path, run_dir)
    loggers = [
        _build(c, **_resumed_logger_kwargs(c, ckpt_path, run_dir))
        for c in (cfg.get("logger") or {}).values()
        if c is not None
    ]
    trainer: L.Trainer = _build(cfg.trainer, plugins=[plugin], callbacks=callbacks, logger=loggers or False)
    try:
        # checkpoints as a same-directory temporary + fsync + rename, never a copy from $TMPDIR (issue 15)
        install_atomic_checkpoint_io(trainer.strategy)
        for logger in trainer.loggers:
            logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))

        model, tokenizer = _build(cfg.model)
        data = _build(cfg.data, tokenizer=tokenizer)
        data.setup("test")
        module = QLoRAModule(
            model, optimizer=optimizer, scheduler=scheduler, adapters_only_checkpoints=cfg.adapters_only_checkpoints
        )
        plugin.convert_module(module)  # now, so the "before" numbers are the quantized base's (fit skips it)
        results: dict[str, Any] = {
            "run_dir": str(run_dir.resolve()),
            "trainable_params": trainable_parameter_count(module),
        }
        evaluate = trainer.is_global_zero and not cfg.trainer.get("fast_dev_run")
        if evaluate and cfg.evaluate.before:
            results["before"] = _evaluate(module, tokenizer, data.examples["test"], cfg, "base model (quantized)")

        fit_start = time.perf_counter()
        trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
        results["train_seconds"] = time.perf_counter() - fit_start
        results["steps"] = trainer.global_step
        results["optimizer"] = type(trainer.optimizers[0]).__name__ if trainer.optimizers else None

        if evaluate and cfg.evaluate.after:
            results["after"] = _evaluate(module, tokenizer, data.examples["test"], cfg, "fine-tuned")
        if trainer.is_global_zero and cfg.save_adapter:
            results.update(_save_adapter(module, run_dir))
            _log_adapter_artifact(trainer, results["adapter_dir"])
        results["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        results["total_seconds"] = time.perf_counter() - start
        if trainer.is_global_zero:
            metrics = {
                f"test/{phase}_{key}": float(results[phase][key])
                for phase in ("before", "after")
                if phase in results
                for key in ("exact_match", "loss")
            }
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)
                logger.finalize("success")
            predictions = _write_predictions(results, data.examples["test"], cfg, run_dir)
            results["files"] = list_run_files(run_dir, also=("results.json",))  # written just below
            slim = {
                k: ({kk: vv for kk, vv in v.items() if kk != "predictions"} if isinstance(v, dict) else v)
                for k, v in results.items()
            }
            atomic_write_text(run_dir / "results.json", json.dumps(slim, indent=2))
            print_report(results, run_dir, predictions, shown_predictions=cfg.evaluate.get("show", 5))
        return results
    finally:
        _finish_wandb_runs(trainer)


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Console entry point; returns the fine-tuned exact match (the objective of Optuna sweeps)."""
    torch.set_float32_matmul_precision("high")
    results = run(cfg)
    after = results.get("after")
    return float(after["exact_match"]) if after else None


if __name__ == "__main__":
    from lightning_qlora.app.quiet import quiet_third_party

    quiet_third_party()  # the entry point's filters (lightning_qlora.cli does the same)
    main()
