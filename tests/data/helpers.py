"""Test helpers: a character-level ChatML tokenizer and a tiny Llama built in-process (no downloads).

One token per character makes label masks computable by hand: ``len(text)`` tokens, plus one
per special token.
"""

from __future__ import annotations

import string

import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

CHATML = (
    "{% for m in messages %}{{'<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{'<|im_start|>assistant\\n'}}{% endif %}"
)
SPECIALS = ["<|im_start|>", "<|im_end|>", "<unk>"]
CHARS = list(string.ascii_letters + string.digits + string.punctuation + " \n")


def make_char_tokenizer(chat_template: str | None = CHATML):
    """ChatML tokenizer, one id per character; ``<|im_end|>`` is both EOS and pad (as in SmolLM2)."""
    vocab = {token: index for index, token in enumerate(SPECIALS + CHARS)}
    backend = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.decoder = tokenizers.decoders.Fuse()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<unk>",
        additional_special_tokens=["<|im_start|>"],
    )
    tokenizer.chat_template = chat_template
    return tokenizer


def make_tiny_llama(vocab_size: int, seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        eos_token_id=1,
        pad_token_id=1,
        bos_token_id=None,
    )
    return transformers.LlamaForCausalLM(config).eval()


def write_jsonl(path, lines: list[str]):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path
