"""Exact match (metric and greedy generation) and answer perplexity."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_qlora.adapters import LoRAConfig, adapter_param_groups
from lightning_qlora.data import (
    ExactMatch,
    InstructionDataModule,
    InstructionExample,
    encode_example,
    evaluate_instruction_model,
    evaluate_loss,
    generate_answers,
)
from lightning_qlora import lm_loss
from lightning_qlora.qlora import QLoRASpec, apply_qlora

from .helpers import make_tiny_llama, write_jsonl


def test_exact_match_metric():
    metric = ExactMatch()
    with pytest.warns(UserWarning, match="before the ``update``"):
        assert math.isnan(metric.compute().item())
    metric.update(["2021-03-05", " 1999-12-31\n", "1999-12-31."], ["2021-03-05", "1999-12-31", "1999-12-31"])
    metric.update(["a"], ["A"])  # case matters: the format is part of the answer
    assert metric.compute().item() == pytest.approx(2 / 4)
    assert (metric.correct.item(), metric.total.item()) == (2, 4)
    metric.reset()
    metric.update([], [])
    assert metric.total.item() == 0
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        metric.update(["a", "b"], ["a"])
    with pytest.raises(TypeError, match="sequences of strings"):
        metric.update("abc", "abc")


PROMPTS = ["hi", "a longer prompt", "mid one", "x", "another, longer, prompt!"]


def test_batched_left_padded_generation_equals_one_by_one(char_tokenizer):
    model = make_tiny_llama(len(char_tokenizer), seed=3)
    examples = [InstructionExample.from_prompt(p, "?") for p in PROMPTS]
    batched = generate_answers(model, char_tokenizer, examples, batch_size=5, max_new_tokens=6, show_progress=False)
    single = [
        generate_answers(model, char_tokenizer, [e], batch_size=1, max_new_tokens=6, show_progress=False)[0]
        for e in examples
    ]
    assert batched == single
    assert all(isinstance(a, str) and len(a) <= 6 for a in batched)


def test_loss_is_the_token_weighted_answer_nll(char_tokenizer):
    model = make_tiny_llama(len(char_tokenizer), seed=1)
    examples = [InstructionExample.from_prompt("ab", "c"), InstructionExample.from_prompt("q", "longer answer")]
    total_nll, total_tokens = 0.0, 0
    for example in examples:
        ids = encode_example(char_tokenizer, example)
        labels = torch.tensor([ids["labels"]])
        with torch.no_grad():
            mean = model(input_ids=torch.tensor([ids["input_ids"]]), labels=labels).loss.item()
        count = int((labels[0, 1:] != -100).sum())
        total_nll += mean * count
        total_tokens += count
    metrics = evaluate_loss(model, char_tokenizer, examples, batch_size=2, show_progress=False)
    assert metrics["loss"] == pytest.approx(total_nll / total_tokens, rel=1e-5)
    assert metrics["perplexity"] == pytest.approx(math.exp(total_nll / total_tokens), rel=1e-5)


def test_no_examples_score_nan_loss_not_an_error(char_tokenizer):
    model = make_tiny_llama(len(char_tokenizer), seed=1)
    metrics = evaluate_loss(model, char_tokenizer, [], batch_size=2, show_progress=False)
    assert math.isnan(metrics["loss"]) and math.isnan(metrics["perplexity"])
    result = evaluate_instruction_model(model, char_tokenizer, [], batch_size=2, show_progress=False)
    assert math.isnan(result["loss"]) and result["num_examples"] == 0 and result["predictions"] == []


def test_the_loss_projects_only_answer_positions_of_length_sorted_batches(char_tokenizer, monkeypatch):
    """The vocabulary projection runs only where a target is, and batches group similar lengths (less padding)."""
    model = make_tiny_llama(len(char_tokenizer), seed=1)
    prompts = ["a much longer prompt than the rest", "ab", "another long prompt, also long", "q"]
    examples = [InstructionExample.from_prompt(p, "yes") for p in prompts]
    encoded = [encode_example(char_tokenizer, example) for example in examples]
    lengths = sorted(len(ids["input_ids"]) for ids in encoded)
    targets = [sum(label != -100 for label in ids["labels"][1:]) for ids in encoded]
    projected: list[int] = []
    fed: list[int] = []
    model.lm_head.register_forward_pre_hook(lambda module, args: projected.append(args[0].shape[:-1].numel()))
    model.model.embed_tokens.register_forward_pre_hook(lambda module, args: fed.append(args[0].numel()))
    monkeypatch.setattr(lm_loss, "MIN_SHARED_PREFIX", 10**9)  # no prefix sharing: whole padded batches
    evaluate_loss(model, char_tokenizer, examples, batch_size=1, show_progress=False)
    assert sum(projected) == sum(targets)  # one row per answer token (the answer and its end of turn)
    fed.clear()
    evaluate_loss(model, char_tokenizer, examples, batch_size=2, show_progress=False)
    assert sum(fed) == 2 * lengths[1] + 2 * lengths[3]  # the two short ones together, then the two long ones


def test_a_shared_prompt_prefix_runs_once_and_changes_no_result(char_tokenizer, monkeypatch):
    """The chat template and instruction every prompt starts with: one row's KV cache, repeated for the batch."""
    model = make_tiny_llama(len(char_tokenizer), seed=2)
    instruction = "Convert the date to ISO. Date: "
    examples = [
        InstructionExample.from_prompt(instruction + d, a)
        for d, a in [("May 1", "05-01"), ("June 22", "06-22"), ("Jan 3", "01-03")]
    ]
    fed: list[int] = []
    model.model.embed_tokens.register_forward_pre_hook(lambda module, args: fed.append(args[0].numel()))
    shared = generate_answers(model, char_tokenizer, examples, batch_size=3, max_new_tokens=5, show_progress=False)
    shared_loss = evaluate_loss(model, char_tokenizer, examples, batch_size=3, show_progress=False)
    shared_fed = sum(fed)
    fed.clear()
    monkeypatch.setattr(lm_loss, "MIN_SHARED_PREFIX", 10**9)
    plain = generate_answers(model, char_tokenizer, examples, batch_size=3, max_new_tokens=5, show_progress=False)
    plain_loss = evaluate_loss(model, char_tokenizer, examples, batch_size=3, show_progress=False)
    assert shared == plain
    assert shared_loss["loss"] == pytest.approx(plain_loss["loss"], rel=1e-5)
    prompt_length = len(char_tokenizer.apply_chat_template([{"role": "user", "content": instruction}], tokenize=True))
    assert sum(fed) - shared_fed >= 2 * 2 * (prompt_length - 20)  # two passes, two rows fewer each (template slack)


def test_qlora_fine_tune_reaches_full_exact_match(char_tokenizer, tmp_path):
    """Masked labels + the same prompt at train and eval time: a tiny NF4 model learns the answers."""
    records = [f'{{"prompt": "{p}", "response": "{p[::-1][:3]}"}}' for p in PROMPTS]
    path = write_jsonl(tmp_path / "train.jsonl", records)
    data = InstructionDataModule(char_tokenizer, train_path=path, batch_size=len(records))
    data.setup("fit")
    model = make_tiny_llama(len(char_tokenizer))
    apply_qlora(model, QLoRASpec(mode="nf4-dq", adapter=LoRAConfig(r=8, alpha=16)))
    examples = data.examples["train"]
    before = evaluate_instruction_model(model, char_tokenizer, examples, max_new_tokens=5, show_progress=False)
    optimizer = torch.optim.AdamW(adapter_param_groups(model, lr=1e-2))
    batch = next(iter(data.train_dataloader()))
    model.train()
    for _ in range(150):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = evaluate_instruction_model(model, char_tokenizer, examples, max_new_tokens=5, show_progress=False)
    assert before["exact_match"] == 0.0
    assert after["predictions"] == [p[::-1][:3] for p in PROMPTS]
    # the frozen random head of a tiny model caps its confidence: the loss falls, but not to ~0
    assert after["exact_match"] == 1.0 and after["loss"] < 0.8 * before["loss"]
    assert after["num_examples"] == len(PROMPTS) and model.training  # evaluation restores the mode


def test_evaluation_restores_mixed_module_modes_and_checks_batch_size(char_tokenizer):
    model = make_tiny_llama(len(char_tokenizer)).train()
    model.model.layers[0].eval()
    examples = [InstructionExample.from_prompt("hi", "x")]
    generate_answers(model, char_tokenizer, examples, max_new_tokens=2, show_progress=False)
    assert model.training and not model.model.layers[0].training and not model.model.layers[0].mlp.training
    with pytest.raises(ValueError, match="batch_size=0"):
        generate_answers(model, char_tokenizer, examples, batch_size=0, show_progress=False)


def _trained_tiny_model(char_tokenizer, tmp_path, prompts, steps=150):
    records = [f'{{"prompt": "{p}", "response": "{p[::-1][:3]}"}}' for p in prompts]
    data = InstructionDataModule(char_tokenizer, train_path=write_jsonl(tmp_path / "train.jsonl", records), batch_size=len(records))
    data.setup("fit")
    model = make_tiny_llama(len(char_tokenizer))
    apply_qlora(model, QLoRASpec(mode="nf4-dq", adapter=LoRAConfig(r=8, alpha=16)))
    optimizer = torch.optim.AdamW(adapter_param_groups(model, lr=1e-2))
    batch = next(iter(data.train_dataloader()))
    model.train()
    for _ in range(steps):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


@pytest.mark.parametrize("max_new_tokens", [5, 2])
def test_answers_read_off_the_teacher_forced_pass_are_greedy_decodings(char_tokenizer, tmp_path, max_new_tokens):
    """Trained prompts are answered from the loss pass; the rest generate from where they depart: same answers."""
    model = _trained_tiny_model(char_tokenizer, tmp_path, PROMPTS)
    # references: the trained answers, one wrong reference, and prompts the model never saw
    examples = [InstructionExample.from_prompt(p, p[::-1][:3]) for p in PROMPTS]
    examples[1] = InstructionExample.from_prompt(PROMPTS[1], "zzz")
    examples += [InstructionExample.from_prompt(p, "abc") for p in ("unseen prompt", "qq")]
    calls: list[int] = []
    original = model.generate
    model.generate = lambda **kwargs: calls.append(kwargs["input_ids"].shape[0]) or original(**kwargs)
    result = evaluate_instruction_model(
        model, char_tokenizer, examples, batch_size=4, max_new_tokens=max_new_tokens, show_progress=False
    )
    generated_rows = sum(calls)
    model.generate = original
    plain = generate_answers(model, char_tokenizer, examples, batch_size=4, max_new_tokens=max_new_tokens, show_progress=False)
    full = evaluate_instruction_model(
        model, char_tokenizer, examples, batch_size=4, max_new_tokens=max_new_tokens, show_progress=False,
        from_teacher_forcing=False,
    )
    assert result["predictions"] == plain == full["predictions"]
    assert result["exact_match"] == full["exact_match"] and result["loss"] == full["loss"]
    # the trained prompts with their own references (4, or all 5 cut at 2 tokens) never reach generate
    assert result["generated"] == generated_rows <= len(examples) - 4
    assert full["generated"] == len(examples)


def test_greedy_from_reference_stops_where_greedy_decoding_would_leave_the_reference():
    from lightning_qlora.data.evaluate import _greedy_from_reference

    eos = 9
    assert _greedy_from_reference([1, 2, eos], [1, 2, eos], 5, eos) == ([1, 2, eos], True)  # all agree: done
    assert _greedy_from_reference([1, 2, eos], [1, 7, 3], 5, eos) == ([1, 7], False)  # departs at 2: go on from 7
    assert _greedy_from_reference([1, 2, eos], [1, eos, 3], 5, eos) == ([1, eos], True)  # greedy stops early
    assert _greedy_from_reference([1, 2, 3, eos], [1, 2, 3, eos], 2, eos) == ([1, 2], True)  # cut at the budget
    assert _greedy_from_reference([1, 2], [1, 2], 5, eos) == ([1, 2], False)  # a cut reference: generate the rest
    assert _greedy_from_reference([], [], 5, eos) == ([], False)
