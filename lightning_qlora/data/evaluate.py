"""Evaluating an instruction-tuned causal LM: exact match by greedy generation, and test perplexity.

Exact match compares the generated answer (decoded without special tokens, surrounding
whitespace stripped) with the reference answer, character for character: the right
score for tasks with one correct, strictly formatted answer.

Example:
    >>> examples = read_instruction_jsonl(task_paths("iso_dates")["test_path"])
    >>> metrics = evaluate_instruction_model(model, tokenizer, examples, max_new_tokens=12)
    >>> metrics["exact_match"], metrics["perplexity"]
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torchmetrics
from rich.progress import Progress
from torch import nn

from lightning_qlora import lm_loss
from lightning_qlora.data.chat import IGNORE_INDEX, generation_prompt_ids, pad_batch, pad_token_id
from lightning_qlora.data.datamodule import encode_examples_with_indices
from lightning_qlora.data.records import InstructionExample
from lightning_qlora.lm_loss import shared_prefix_target_logits


class ExactMatch(torchmetrics.Metric):
    """Fraction of predictions equal to their reference after stripping surrounding whitespace.

    ``exact_match = correct / total``; states are summed across processes. ``compute()``
    before any ``update`` returns NaN (there is no score of zero examples).

    Example:
        >>> metric = ExactMatch()
        >>> metric.update(["2021-03-05", " 1999-12-31\\n"], ["2021-03-05", "1999-12-30"])
        >>> metric.compute()
        tensor(0.5000)
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False
    correct: torch.Tensor
    total: torch.Tensor

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("correct", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, predictions: Sequence[str], references: Sequence[str]) -> None:
        """Add a batch of predicted and reference strings (same length)."""
        if isinstance(predictions, str) or isinstance(references, str):
            raise TypeError("ExactMatch.update takes sequences of strings; wrap a single string in a list.")
        if len(predictions) != len(references):
            raise ValueError(f"{len(predictions)} predictions but {len(references)} references; they must pair up.")
        self.correct += sum(p.strip() == r.strip() for p, r in zip(predictions, references))
        self.total += len(references)

    def compute(self) -> torch.Tensor:
        """``correct / total`` as a float tensor (NaN when nothing was added)."""
        return self.correct.float() / self.total


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    # restore each module's own flag: models often mix modes (frozen parts kept in eval)
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for module, training in modes:
            module.training = training


def _check_batch_size(batch_size: Any) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be a positive integer.")


def _batches(count: int, batch_size: int, description: str, show_progress: bool) -> Iterator[range]:
    starts = range(0, count, batch_size)
    with Progress(disable=not show_progress, transient=True) as progress:
        task = progress.add_task(description, total=len(starts))
        for number, start in enumerate(starts, start=1):
            progress.update(task, description=f"{description}, batch {number}/{len(starts)}")
            yield range(start, min(start + batch_size, count))
            progress.advance(task, 1)


class _TokenTicks:
    """A transformers stopping criterion that never stops: it advances a progress bar once per generated token."""

    def __init__(self, progress: Progress, task: Any) -> None:
        self.progress, self.task = progress, task

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        self.progress.advance(self.task, 1)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _shared_prefix(sequences: Sequence[Sequence[int]], limit: int) -> int:
    """Length of the prefix every sequence starts with, at most ``limit``."""
    first = sequences[0]
    length = 0
    while length < limit and all(sequence[length] == first[length] for sequence in sequences):
        length += 1
    return length


def _prefix_cache(model: nn.Module, prefix: Sequence[int], rows: int, device: torch.device) -> Any | None:
    """:func:`~lightning_qlora.lm_loss.prefix_cache` of a batch's common prompt prefix, if long enough to pay.

    Every prompt of a batch starts with the same chat template, system prompt and instruction
    (47 of the main job's ~64 prompt tokens): computing them once instead of once per row takes
    most of the prefill's work away.
    """
    if len(prefix) < lm_loss.MIN_SHARED_PREFIX:
        return None
    return lm_loss.prefix_cache(model, torch.tensor(list(prefix), dtype=torch.long, device=device), rows)


def _with_prefix(prefix: Sequence[int], rest: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``rest`` (a padded batch of what follows ``prefix``) with the prefix's columns in front."""
    rows = rest["input_ids"].shape[0]
    ids = torch.tensor(list(prefix), dtype=torch.long).expand(rows, -1)
    return {
        "input_ids": torch.cat([ids, rest["input_ids"]], 1),
        "attention_mask": torch.cat([torch.ones_like(ids), rest["attention_mask"]], 1),
    }


def _greedy_tokens(
    model: nn.Module,
    tokenizer: Any,
    starts: Sequence[Sequence[int]],
    budgets: Sequence[int],
    *,
    batch_size: int,
    show_progress: bool,
) -> list[list[int]]:
    """Greedy new tokens after each token sequence of ``starts``: at most ``budgets[i]``, cut after EOS (kept).

    Sequences are sorted by length and left-padded in batches (less padding, and every sequence's
    last token sits at the same position). The prefix every sequence of a batch shares (chat
    template, system prompt, instruction) is run once and its KV cache repeated for the batch; each
    row's own tokens follow it, left-padded (masked; positions come from the mask). A batch
    generates up to its largest budget; each row is cut to its own afterwards (greedy decoding
    does not depend on how far it runs).
    """
    order = sorted(range(len(starts)), key=lambda i: len(starts[i]))
    pad_id = pad_token_id(tokenizer)
    eos_id = getattr(tokenizer, "eos_token_id", None)
    device = _device(model)
    tokens: list[list[int]] = [[] for _ in starts]
    chunks = [order[first : first + batch_size] for first in range(0, len(order), batch_size)]
    lengths = [max(budgets[i] for i in chunk) for chunk in chunks]
    from transformers import StoppingCriteriaList

    # one tick per generated token of each batch: a batch of 50 prompts takes seconds, not one jump
    with _eval_mode(model), Progress(disable=not show_progress, transient=True) as progress:
        task = progress.add_task("generating answers", total=sum(lengths))
        for number, (indices, new_tokens) in enumerate(zip(chunks, lengths), start=1):
            progress.update(task, description=f"generating answers, batch {number}/{len(chunks)}")
            rows = [list(starts[i]) for i in indices]
            shared = _shared_prefix(rows, min(len(row) for row in rows) - 1)  # each row keeps a token of its own
            cache = _prefix_cache(model, rows[0][:shared], len(rows), device)
            if cache is None:
                batch = pad_batch([{"input_ids": row} for row in rows], pad_id, padding_side="left")
            else:  # the prefix, then each row's own tokens left-padded after it (masked, positions from the mask)
                rest = pad_batch([{"input_ids": row[shared:]} for row in rows], pad_id, padding_side="left")
                batch = _with_prefix(rows[0][:shared], rest)
            output = model.generate(
                input_ids=batch["input_ids"].to(device),
                attention_mask=batch["attention_mask"].to(device),
                **({lm_loss.cache_keyword(model): cache} if cache is not None else {}),
                max_new_tokens=new_tokens,
                do_sample=False,
                num_beams=1,
                pad_token_id=pad_id,
                eos_token_id=eos_id,
                stopping_criteria=StoppingCriteriaList([_TokenTicks(progress, task)]),
            )
            progress.update(task, completed=sum(lengths[:number]))  # the batch may have stopped early (EOS)
            for index, row in zip(indices, output[:, batch["input_ids"].shape[1] :].tolist()):
                row = row[: budgets[index]]
                tokens[index] = row[: row.index(eos_id) + 1] if eos_id is not None and eos_id in row else row
    return tokens


def generate_answers(
    model: nn.Module,
    tokenizer: Any,
    examples: Sequence[InstructionExample],
    *,
    batch_size: int = 32,
    max_new_tokens: int = 16,
    show_progress: bool = True,
) -> list[str]:
    """Greedy answers of ``model`` to each example's prompt messages, in the order of ``examples``.

    Prompts are sorted by length and left-padded in batches, the prefix every prompt of a batch
    shares is run once (see :func:`_greedy_tokens`). Generation stops at the tokenizer's EOS (the
    chat end-of-turn token for instruct models) or after ``max_new_tokens``.

    Args:
        model: a transformers causal LM (has ``generate``).
        tokenizer: its tokenizer, with a chat template.
        examples: what to answer; only ``prompt_messages`` are shown to the model.
        batch_size: prompts generated together.
        max_new_tokens: cap on the answer length (the answer is cut there).
        show_progress: show a rich progress bar.

    Returns:
        decoded answers, special tokens removed, surrounding whitespace stripped.
    """
    _check_batch_size(batch_size)
    prompts = [generation_prompt_ids(tokenizer, example) for example in examples]
    tokens = _greedy_tokens(
        model, tokenizer, prompts, [max_new_tokens] * len(prompts), batch_size=batch_size, show_progress=show_progress
    )
    return [tokenizer.decode(row, skip_special_tokens=True).strip() for row in tokens]


def _teacher_forced(
    model: nn.Module,
    tokenizer: Any,
    examples: Sequence[InstructionExample],
    *,
    batch_size: int,
    max_length: int | None,
    show_progress: bool,
) -> tuple[float, int, dict[int, tuple[list[int], list[int]]]]:
    """One teacher-forced pass over prompt + reference answer of every example.

    Returns ``(summed answer-token NLL, answer tokens, greedy)``: ``greedy[i]`` pairs example
    ``i``'s answer tokens with the model's most likely token at each of their positions (given the
    prompt and the reference before it). Examples whose answer ``max_length`` cuts away entirely are
    left out (with a warning, as in training).
    """
    _check_batch_size(batch_size)
    encoded = encode_examples_with_indices(tokenizer, examples, max_length, "evaluation")
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][1]["input_ids"]))  # less padding
    pad_id = pad_token_id(tokenizer)
    device = _device(model)
    total, count = 0.0, 0
    greedy: dict[int, tuple[list[int], list[int]]] = {}
    with _eval_mode(model):
        for chunk in _batches(len(encoded), batch_size, "test loss", show_progress):
            rows = [encoded[order[i]] for i in chunk]
            batch = {k: v.to(device) for k, v in pad_batch([row for _, row in rows], pad_id).items()}
            logits, targets = shared_prefix_target_logits(
                model, batch["input_ids"], batch["attention_mask"], batch["labels"]
            )
            total += float(
                nn.functional.cross_entropy(
                    logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
                )
            )
            answer = targets != IGNORE_INDEX
            count += int(answer.sum())
            likeliest = logits.argmax(-1)
            for (index, _), mask, row_targets, row_likeliest in zip(rows, answer, targets, likeliest):
                greedy[index] = (row_targets[mask].tolist(), row_likeliest[mask].tolist())
    return total, count, greedy


def _loss_figures(total: float, count: int) -> dict[str, float]:
    """Mean answer-token loss and its perplexity; NaN for both when no answer token was scored."""
    loss = total / count if count else math.nan
    return {"loss": loss, "perplexity": math.exp(loss)}


def evaluate_loss(
    model: nn.Module,
    tokenizer: Any,
    examples: Sequence[InstructionExample],
    *,
    batch_size: int = 16,
    max_length: int | None = None,
    show_progress: bool = True,
) -> dict[str, float]:
    """Answer-token loss and perplexity of ``model`` on ``examples`` (teacher forcing).

    Uses the same encoding as training (labels only on the answer), so ``loss`` is
    comparable with the training loss; it is averaged over answer tokens of the whole set
    (not over batches), and ``perplexity = exp(loss)``. Examples are batched by length (less
    padding), the prompt prefix a batch shares is run once (its KV cache repeated for every row),
    and only positions with a target go through the ``lm_head``
    (:func:`~lightning_qlora.lm_loss.shared_prefix_target_logits`, as in training).
    """
    total, count, _ = _teacher_forced(
        model, tokenizer, examples, batch_size=batch_size, max_length=max_length, show_progress=show_progress
    )
    return _loss_figures(total, count)


def _greedy_from_reference(
    answer: Sequence[int], likeliest: Sequence[int], max_new_tokens: int, eos_id: int | None
) -> tuple[list[int], bool]:
    """The greedy tokens the teacher-forced pass already shows, and whether the answer ends there.

    Greedy decoding's token at step ``k`` is the model's likeliest token given the prompt and its
    own earlier tokens; while those equal the reference's, it is the teacher-forced pass's
    likeliest token at position ``k``. So the greedy answer follows the pass until its first
    token that differs from the reference (included: greedy chose it), its EOS, or
    ``max_new_tokens``; only then must generation go on (from there).
    """
    tokens: list[int] = []
    for target, choice in zip(answer, likeliest):
        if len(tokens) == max_new_tokens:
            return tokens, True
        tokens.append(choice)
        if choice == eos_id:
            return tokens, True
        if choice != target:
            break
    return tokens, len(tokens) >= max_new_tokens


def evaluate_instruction_model(
    model: nn.Module,
    tokenizer: Any,
    examples: Sequence[InstructionExample],
    *,
    batch_size: int = 32,
    max_new_tokens: int = 16,
    max_length: int | None = None,
    show_progress: bool = True,
    from_teacher_forcing: bool = True,
) -> dict[str, Any]:
    """Exact match (greedy generation) and answer loss/perplexity on ``examples``.

    The loss comes from one teacher-forced pass over prompt + reference answer. That pass also
    shows the greedy answer as far as it agrees with the reference (:func:`_greedy_from_reference`):
    an example whose likeliest token is the reference's at every answer position up to the end of
    turn -- most examples once a model is trained -- is answered without generating, and any other
    is generated only from where it departs from the reference. The answers are those of
    step-by-step greedy decoding (:func:`generate_answers`) up to floating-point rounding: two
    passes of different shapes may break a near-tie between two tokens differently, as two batch
    sizes of ``generate`` may. ``from_teacher_forcing=False`` generates every answer in full.

    Returns:
        ``{"exact_match": float in [0, 1], "loss": float, "perplexity": float, "num_examples": int,
        "predictions": list[str]}`` (drop ``predictions`` before logging the rest as metrics).
    """
    total, count, greedy = _teacher_forced(
        model, tokenizer, examples, batch_size=batch_size, max_length=max_length, show_progress=show_progress
    )
    eos_id = getattr(tokenizer, "eos_token_id", None)
    known: list[list[int]] = []
    budgets: list[int] = []
    for index in range(len(examples)):
        answer, likeliest = greedy.get(index, ([], []))
        tokens, finished = (
            _greedy_from_reference(answer, likeliest, max_new_tokens, eos_id) if from_teacher_forcing else ([], False)
        )
        known.append(tokens)
        budgets.append(0 if finished else max_new_tokens - len(tokens))
    pending = [i for i, budget in enumerate(budgets) if budget > 0]
    if pending:
        starts = [generation_prompt_ids(tokenizer, examples[i]) + known[i] for i in pending]
        continued = _greedy_tokens(
            model, tokenizer, starts, [budgets[i] for i in pending], batch_size=batch_size, show_progress=show_progress
        )
        for index, tokens in zip(pending, continued):
            known[index] = known[index] + tokens
    predictions = [tokenizer.decode(tokens, skip_special_tokens=True).strip() for tokens in known]
    metric = ExactMatch()
    metric.update(predictions, [example.reference for example in examples])
    return {
        "exact_match": float(metric.compute()),
        **_loss_figures(total, count),
        "num_examples": len(examples),
        "predictions": predictions,
        "generated": len(pending),
    }
