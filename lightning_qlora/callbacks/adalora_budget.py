"""``AdaLoRABudget``: the AdaLoRA rank-budget scheduler as a Lightning callback.

AdaLoRA (Zhang et al., https://arxiv.org/abs/2303.10512) starts every adapted layer at rank
``r`` and prunes singular-value triplets ``(P_:i, lambda_i, Q_i:)`` globally, by importance,
until a target budget is reached. The budget (total kept triplets over all layers) follows

    b(t) = b0                                                   t < t_i
    b(t) = b_T + (b0 - b_T) (1 - (t - t_i) / (T - t_i - t_f))^3  t_i <= t < T - t_f
    b(t) = b_T                                                  t >= T - t_f

(rounded down), where ``t`` counts optimizer steps done. At every step of the middle phase
with ``t % mask_interval == 0`` (the grid of AdaLoRA's reference code and PEFT), and once when
the final phase starts, the ``b(t)`` triplets with the highest
score ``S_i = s(lambda_i) + mean_j s(P_ji) + mean_j s(Q_ij)`` are kept and the rest masked
(``s = I_bar * U_bar`` with ``I = |w * grad|``; see
:class:`~lightning_qlora.adapters.AdaLoRALayer`). The final mask stays fixed.

Because the callback runs on every optimizer step by itself, AdaLoRA cannot silently turn
into plain LoRA (the PEFT pitfall of forgetting ``update_and_allocate``). Importance is read
in ``on_before_optimizer_step``, so under gradient accumulation it comes from the final,
accumulated gradients; the orthogonality loss (the layers' ``extra_loss()``) is added to the
loss by the precision plugin, for any LightningModule.

Example:
    >>> trainer = L.Trainer(plugins=[NF4Precision(adapter=AdaLoRAConfig(r=12))],
    ...                     callbacks=[AdaLoRABudget(target_rank=4, init_warmup=50, final_warmup=100)])
"""

from __future__ import annotations

import json
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from lightning_qlora.adapters import AdaLoRALayer
from lightning_qlora.callbacks.errors import CallbackConfigError, required_layers
from lightning_qlora.callbacks.plots import log_dir, log_image, rank_heatmap


def budget_schedule(
    step: int, initial_budget: int, target_budget: int, init_warmup: int, final_warmup: int, total_steps: int
) -> int:
    """AdaLoRA's cubic budget ``b(t)`` (see the module docstring) at optimizer step ``step``."""
    if step < init_warmup:
        return initial_budget
    if step >= total_steps - final_warmup:
        return target_budget
    progress = (step - init_warmup) / (total_steps - init_warmup - final_warmup)
    return int(target_budget + (initial_budget - target_budget) * (1 - progress) ** 3)


def keep_top_triplets(layers: dict[str, AdaLoRALayer], budget: int) -> dict[str, int]:
    """Mask all but the ``budget`` highest-scoring triplets over ``layers``; returns ranks kept.

    Ties are broken by layer order, then rank index (a stable sort), so runs are reproducible.
    """
    scores = [layer.triplet_scores().detach().float().cpu() for layer in layers.values()]
    flat = torch.cat(scores)
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[torch.sort(flat, descending=True, stable=True).indices[:budget]] = True
    ranks, start = {}, 0
    for (name, layer), layer_scores in zip(layers.items(), scores, strict=True):
        mask = keep[start : start + layer_scores.numel()]
        start += layer_scores.numel()
        layer.set_rank_mask(mask.to(layer.rank_mask.device))
        ranks[name] = int(mask.sum())
    return ranks


class AdaLoRABudget(L.Callback):
    """Prune AdaLoRA ranks to a global budget on AdaLoRA's cubic schedule.

    Args:
        target_rank: average rank per layer at the end (PEFT's ``target_r``); the budget is
            ``target_rank * number of AdaLoRA layers``. Give this or ``target_budget``.
        target_budget: total triplets kept at the end over all layers.
        init_warmup: ``t_i``, steps of full-rank training before pruning starts.
        final_warmup: ``t_f``, steps at the final budget with a fixed mask.
        mask_interval: ``delta_T``, steps between masking in the pruning phase.
        total_steps: ``T``; default: the Trainer's ``max_steps`` or its estimated stepping batches.
        beta1: EMA factor of the sensitivity ``I_bar``.
        beta2: EMA factor of the uncertainty ``U_bar``.
        plot: write ``adalora_ranks.png`` (and ``adalora_ranks.json``) to the log dir at the end.
    """

    def __init__(
        self,
        target_rank: float | None = None,
        target_budget: int | None = None,
        init_warmup: int = 0,
        final_warmup: int = 0,
        mask_interval: int = 10,
        total_steps: int | None = None,
        beta1: float = 0.85,
        beta2: float = 0.85,
        plot: bool = True,
    ) -> None:
        if (target_rank is None) == (target_budget is None):
            raise CallbackConfigError(
                f"AdaLoRABudget needs exactly one of target_rank (average per layer) or target_budget (total), "
                f"got target_rank={target_rank!r}, target_budget={target_budget!r}."
            )
        if target_rank is not None and not target_rank > 0:
            raise CallbackConfigError(f"AdaLoRABudget: target_rank={target_rank!r} must be > 0.")
        if target_budget is not None and (not isinstance(target_budget, int) or target_budget < 1):
            raise CallbackConfigError(f"AdaLoRABudget: target_budget={target_budget!r} must be an int >= 1.")
        for name, value in (("init_warmup", init_warmup), ("final_warmup", final_warmup)):
            if not isinstance(value, int) or value < 0:
                raise CallbackConfigError(f"AdaLoRABudget: {name}={value!r} must be an int >= 0.")
        if not isinstance(mask_interval, int) or mask_interval < 1:
            raise CallbackConfigError(f"AdaLoRABudget: mask_interval={mask_interval!r} must be an int >= 1.")
        for name, value in (("beta1", beta1), ("beta2", beta2)):
            if not 0 <= value < 1:
                raise CallbackConfigError(f"AdaLoRABudget: {name}={value!r} must be in [0, 1), e.g. 0.85.")
        self.target_rank, self.target_budget_arg = target_rank, target_budget
        self.init_warmup, self.final_warmup, self.mask_interval = init_warmup, final_warmup, mask_interval
        self.total_steps_arg, self.beta1, self.beta2, self.plot = total_steps, beta1, beta2, plot
        self._layers: dict[str, AdaLoRALayer] = {}
        self.initial_budget = self.target_budget = self.total_steps = 0
        self.last_step = 0
        self.final_applied = False
        self.history: list[tuple[int, int, int]] = []  # (step, b(t), ranks kept) at every masking
        self._pending_importance: dict[str, dict[str, torch.Tensor]] = {}

    # -- the schedule --------------------------------------------------------------------

    def budget(self, step: int) -> int:
        """``b(step)`` for this run (valid once fit has started)."""
        return budget_schedule(
            step, self.initial_budget, self.target_budget, self.init_warmup, self.final_warmup, self.total_steps
        )

    def ranks(self) -> dict[str, int]:
        """Ranks currently kept, per layer."""
        return {name: layer.rank for name, layer in self._layers.items()}

    # -- Lightning hooks -----------------------------------------------------------------

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._layers = required_layers(pl_module, AdaLoRALayer, "AdaLoRABudget", "AdaLoRA", "AdaLoRAConfig")
        self.initial_budget = sum(layer.config.r for layer in self._layers.values())
        if self.target_budget_arg is not None:
            self.target_budget = self.target_budget_arg
        else:
            self.target_budget = int(self.target_rank * len(self._layers))
        if self.target_budget > self.initial_budget or self.target_budget < 1:
            raise CallbackConfigError(
                f"AdaLoRABudget: target budget {self.target_budget} must be in [1, {self.initial_budget}] (the initial "
                f"budget: {len(self._layers)} layers x r); lower target_rank/target_budget or raise AdaLoRAConfig.r."
            )
        self.total_steps = self._resolve_total_steps(trainer)
        if self.init_warmup + self.final_warmup >= self.total_steps:
            raise CallbackConfigError(
                f"AdaLoRABudget: init_warmup + final_warmup = {self.init_warmup} + {self.final_warmup} must be below "
                f"total_steps={self.total_steps}, or the budget never decreases; shorten the warmups or train longer."
            )
        for name, state in self._pending_importance.items():
            if name in self._layers:
                self._layers[name].load_importance_state(state)
        self._pending_importance = {}

    def _resolve_total_steps(self, trainer: L.Trainer) -> int:
        if self.total_steps_arg is not None:
            total = self.total_steps_arg
        elif trainer.max_steps and trainer.max_steps > 0:
            total = trainer.max_steps
        else:
            total = trainer.estimated_stepping_batches
        if not isinstance(total, int) and not (isinstance(total, float) and total.is_integer()):
            raise CallbackConfigError(
                f"AdaLoRABudget: cannot tell the number of training steps (got {total!r}); pass total_steps=... "
                "or set Trainer(max_steps=...)."
            )
        return int(total)

    @override
    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        for layer in self._layers.values():  # gradients are final here, also under accumulation
            layer.update_importance(self.beta1, self.beta2)

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step == self.last_step:  # accumulating: no optimizer step on this batch
            return
        self.last_step = step
        with torch.no_grad():  # optimizer momentum moves masked lambdas: keep them at zero, as PEFT does
            for layer in self._layers.values():
                layer.lora_E.mul_(layer.rank_mask)
        if step < self.init_warmup or self.final_applied:
            return
        final = step >= self.total_steps - self.final_warmup
        # the reference grid (AdaLoRA's code and PEFT): mask when t % delta_T == 0, not counted from t_i
        if not final and step % self.mask_interval != 0:
            return
        budget = self.budget(step)
        ranks = keep_top_triplets(self._layers, budget)
        self.final_applied = final
        self.history.append((step, budget, sum(ranks.values())))
        metrics = {f"adalora/rank/{name}": float(rank) for name, rank in ranks.items()}
        for logger in trainer.loggers:
            logger.log_metrics({"adalora/budget": float(budget), **metrics}, step=step)

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        ranks = self.ranks()
        rank_zero_info(
            f"AdaLoRA: kept {sum(ranks.values())} of {self.initial_budget} ranks "
            f"(target {self.target_budget}); per layer min {min(ranks.values())}, max {max(ranks.values())}"
        )
        if not self.plot or trainer.global_rank != 0:
            return
        directory = log_dir(trainer)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "adalora_ranks.json").write_text(json.dumps(ranks, indent=2))
        path = rank_heatmap(ranks, directory / "adalora_ranks.png")
        log_image(trainer, "adalora/ranks", path)

    # -- checkpointing -------------------------------------------------------------------

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "last_step": self.last_step,
            "final_applied": self.final_applied,
            "history": [list(entry) for entry in self.history],
            "importance": {name: layer.importance_state() for name, layer in self._layers.items()},
            "rank_pattern": self.ranks(),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        try:
            self.last_step = int(state_dict["last_step"])
            self.final_applied = bool(state_dict["final_applied"])
            self.history = [tuple(int(v) for v in entry) for entry in state_dict["history"]]
            self._pending_importance = dict(state_dict["importance"])
        except (KeyError, TypeError, ValueError) as error:
            raise CallbackConfigError(f"AdaLoRABudget state in the checkpoint is damaged ({error!r}).") from None
