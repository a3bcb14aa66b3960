"""Tiny random checkpoints of the five tested families, written the way users get them: ``save_pretrained``.

Hidden 64, 2 layers, bf16 weights sharded into several files, the tiny ChatML tokenizer saved
next to them. Every weight is randomized (norm scales and biases included, which transformers
initializes to constants) so that a weight loaded into the wrong slot changes the logits.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lightning_qlora.models.tiny import tiny_tokenizer

FAMILIES = ("llama", "qwen2", "mistral", "gemma2", "phi3")
HIDDEN, LAYERS = 64, 2


def tiny_config(family: str, vocab_size: int, **overrides: Any) -> Any:
    """A 64-wide, 2-layer config of ``family`` (Qwen2 and Gemma 2 tie their embeddings, as the real ones)."""
    import transformers

    common = dict(
        vocab_size=vocab_size,
        hidden_size=HIDDEN,
        intermediate_size=2 * HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        **overrides,
    )
    configs = {
        "llama": lambda: transformers.LlamaConfig(**common, tie_word_embeddings=False),
        "qwen2": lambda: transformers.Qwen2Config(**common, tie_word_embeddings=True),
        "mistral": lambda: transformers.MistralConfig(**common, sliding_window=8, tie_word_embeddings=False),
        "gemma2": lambda: transformers.Gemma2Config(**common, head_dim=16, tie_word_embeddings=True),
        "phi3": lambda: transformers.Phi3Config(**common, tie_word_embeddings=False),
    }
    return configs[family]()


def randomize_(model: torch.nn.Module, seed: int = 0) -> None:
    """Every parameter random: matrices N(0, 0.05^2), vectors (norm scales, biases) around their init."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            noise = torch.randn(param.shape, generator=generator)
            if param.dim() >= 2:
                param.copy_(0.05 * noise)
            else:
                param.add_(0.1 * noise)


def write_tiny_checkpoint(family: str, directory: Path, seed: int = 0, max_shard_size: str = "60KB") -> Path:
    """``save_pretrained`` a random tiny ``family`` model (bf16, >= 2 shards) and the tiny tokenizer."""
    import transformers

    tokenizer = tiny_tokenizer()
    config = tiny_config(
        family,
        len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    randomize_(model, seed)
    model.to(torch.bfloat16).save_pretrained(directory, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(directory)
    return directory
