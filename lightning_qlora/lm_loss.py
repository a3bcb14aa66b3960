"""A causal LM's next-token logits where there is a target, and its loss from them.

An instruction batch has targets on its answers only; projecting every position through the
vocabulary (49k columns for SmolLM2) is most of the ``lm_head``'s work, in training and in the
evaluation loss alike. :func:`target_logits` asks the model for the positions where some row has
a target (transformers' ``logits_to_keep``, >= 4.50) and returns those logits with their targets.

Rows of an instruction batch also start alike: chat template, system prompt, instruction (47 of
the main job's 64 tokens). :func:`causal_lm_loss` runs such a shared prefix once, as one row, and
repeats its KV cache for the batch (:func:`prefix_cache`); the rest of each row attends to it as
it would to its own copy. The prefix predicts no target and, attention being causal, never sees
what follows, so the loss and the gradients are the full batch's -- except that adapter dropout
draws one mask for the prefix that every row then shares (independent per row otherwise).
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch
from torch import nn

#: label of a position without a target (transformers' and PyTorch's ``ignore_index``)
IGNORE_INDEX = -100


#: a prefix shared by every row is run once when it has at least this many tokens
MIN_SHARED_PREFIX = 8


@functools.cache
def _forward_parameters(forward: Any) -> frozenset[str]:
    try:
        return frozenset(inspect.signature(forward).parameters)
    except (TypeError, ValueError):
        return frozenset()


def _accepts(model: nn.Module, name: str) -> bool:
    """Whether ``model.forward`` takes ``name`` (its signature read once per forward function, not per step)."""
    return name in _forward_parameters(getattr(model.forward, "__func__", model.forward))


def cache_keyword(model: nn.Module) -> str:
    """The KV cache's keyword and output field: ``cache`` from transformers 5.2x, ``past_key_values`` before."""
    return "cache" if _accepts(model, "cache") else "past_key_values"


def prefix_cache(model: nn.Module, prefix: torch.Tensor, rows: int) -> Any | None:
    """The KV cache of ``prefix`` (token ids ``(P,)``, run once as one row) repeated for ``rows`` rows.

    ``None`` when the model returns no cache that can be repeated (then run the rows in full).
    Under autograd the repeat is differentiable: each row's gradient flows back into the one prefix.
    """
    keep = {"logits_to_keep": 1} if _accepts(model, "logits_to_keep") else {}
    output = model(input_ids=prefix.reshape(1, -1), use_cache=True, **keep)
    cache = getattr(output, cache_keyword(model), None)
    if cache is None or not hasattr(cache, "batch_repeat_interleave"):
        return None
    cache.batch_repeat_interleave(rows)
    return cache


def shared_prefix_length(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, labels: torch.Tensor) -> int:
    """Leading positions where every row has the same token, unmasked, predicting no target (at most ``T - 1``)."""
    if input_ids.shape[0] < 2:
        return 0
    same = (input_ids == input_ids[:1]).all(0)
    if attention_mask is not None:
        same &= (attention_mask != 0).all(0)
    # position t predicts labels[:, t + 1]: the prefix must predict nothing
    usable = same[:-1] & (labels[:, 1:] == IGNORE_INDEX).all(0)
    return int(usable.int().cumprod(0).sum())


def target_logits(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    labels: torch.Tensor,
    *,
    rows_only: bool = False,
    **model_kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits (B, K, V), targets (B, K))`` at the K positions where some row has a target.

    Position ``t`` predicts ``labels[:, t + 1]``; rows without a target at a kept position have
    :data:`IGNORE_INDEX` there. Models without ``logits_to_keep`` project every position (K = T - 1).
    ``model_kwargs`` go to the model (e.g. ``past_key_values`` and ``position_ids`` of a cached prefix).

    ``rows_only=True`` returns ``(logits (M, V), targets (M,))`` instead, for just the M (row,
    position) pairs that have a target: rows of an instruction batch end their prompts at
    different positions, so a quarter of the B x K kept positions have no target in the main
    job (96 of 120-128). The hidden states are gathered before the output layer (a forward
    pre-hook on ``model.get_output_embeddings()`` while the model runs), so those rows are never
    projected onto the vocabulary. Where that layer is not found or not called as expected, the
    result is the flattened ``(B * K, V)`` logits with :data:`IGNORE_INDEX` targets, as without it.
    Example: see :func:`causal_lm_loss`.
    """
    targets = labels[:, 1:]
    if not _accepts(model, "logits_to_keep"):
        logits = model(input_ids=input_ids, attention_mask=attention_mask, **model_kwargs).logits[:, :-1]
        return (logits.flatten(0, 1), targets.flatten()) if rows_only else (logits, targets)
    has_target = targets != IGNORE_INDEX
    keep = has_target.any(0).nonzero().squeeze(1)
    kept = has_target[:, keep]  # (B, K): which kept positions of each row have a target
    head = model.get_output_embeddings() if rows_only and hasattr(model, "get_output_embeddings") else None
    gathered: list[bool] = []

    def gather_rows(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        hidden = args[0] if args else None
        if gathered or not isinstance(hidden, torch.Tensor) or hidden.shape[:2] != kept.shape:
            return None  # not the projection of the kept positions: leave the call as it is
        gathered.append(True)
        return (hidden[kept].unsqueeze(0), *args[1:])  # (1, M, H): still a batch of sequences

    handle = head.register_forward_pre_hook(gather_rows) if isinstance(head, nn.Module) else None
    try:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=keep, **model_kwargs).logits
    finally:
        if handle is not None:
            handle.remove()
    if gathered:
        return logits[0], targets[:, keep][kept]
    if rows_only:
        return logits.flatten(0, 1), targets[:, keep].flatten()
    return logits, targets[:, keep]


def shared_prefix_target_logits(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    labels: torch.Tensor,
    *,
    rows_only: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`target_logits` of a right-padded batch, its shared prefix (:func:`shared_prefix_length`) run once.

    Rows the prefix does not pay for (shorter than :data:`MIN_SHARED_PREFIX`, gradient checkpointing,
    a model without a repeatable cache) run in full.
    """
    checkpointing = getattr(model, "is_activation_checkpointing", None)  # transformers >= 5.x; deprecates the next
    if checkpointing is None:
        checkpointing = getattr(model, "is_gradient_checkpointing", False)
    shared = 0 if checkpointing else shared_prefix_length(input_ids, attention_mask, labels)
    cache = prefix_cache(model, input_ids[0, :shared], input_ids.shape[0]) if shared >= MIN_SHARED_PREFIX else None
    if cache is None:
        return target_logits(model, input_ids, attention_mask, labels, rows_only=rows_only)
    # each row's own tokens after the prefix; positions run on from it (as without the cache)
    positions = torch.arange(shared, input_ids.shape[1], device=input_ids.device).expand(input_ids.shape[0], -1)
    rest = {"position_ids": positions, cache_keyword(model): cache}
    return target_logits(model, input_ids[:, shared:], attention_mask, labels[:, shared:], rows_only=rows_only, **rest)


def causal_lm_loss(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """transformers' causal-LM loss (next-token cross entropy, mean over targets, -100 ignored), projected sparsely.

    Position ``t`` predicts ``labels[:, t + 1]``; only positions where some row has a target reach
    the model's last layers (``logits_to_keep``, transformers >= 4.50), and of those only the rows
    that have one go through the ``lm_head`` (``target_logits(rows_only=True)``). An instruction
    batch has targets on its answers only, so this skips most of the vocabulary projection, forward
    and backward. A prefix every row shares runs once (see the module docs). Models without
    ``logits_to_keep`` get transformers' own loss (``labels=``).

    Example:
        >>> import transformers
        >>> model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        ...     vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        ...     num_attention_heads=2, num_key_value_heads=1))
        >>> ids = torch.randint(0, 32, (2, 8))
        >>> labels = torch.where(torch.arange(8) >= 5, ids, -100)
        >>> bool(torch.isclose(causal_lm_loss(model, ids, labels=labels), model(input_ids=ids, labels=labels).loss))
        True
        >>> logits, targets = target_logits(model, ids, None, labels)  # the 3 positions that predict a target
        >>> logits.shape, targets.shape
        (torch.Size([2, 3, 32]), torch.Size([2, 3]))
    """
    labels = input_ids if labels is None else labels
    if not _accepts(model, "logits_to_keep"):
        return model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
    logits, targets = shared_prefix_target_logits(model, input_ids, attention_mask, labels, rows_only=True)
    return nn.functional.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX, reduction="mean")
