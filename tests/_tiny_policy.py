"""Shared test helpers: the real SmolLM2 tokenizer, a tiny random Llama, made-up records.

Imported by the policy/trainer tests and by the ``accelerate launch`` script
(``_accelerate_train.py``), which is why this is a module and not a conftest.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from qpo_middleware.training.dataset import Record
from qpo_middleware.training.models import resolve_model

QUERIES = [
    "The film was a delight from start to finish.",
    "I want my two hours back; the plot made no sense.",
    "A quiet, moving story with a great lead performance.",
    "Loud, long and forgettable.",
    "The soundtrack alone is worth the ticket.",
    "Nothing works: the jokes fall flat and the pacing drags.",
    "An honest, funny and warm little movie.",
    "I fell asleep twice.",
]
PROMPTS = [
    "Classify the sentiment of the review as positive or negative.",
    "Is this movie review positive or negative? Answer with one word.",
    "",  # the "no instruction" baseline
    "Read the review carefully and decide whether the writer liked the film.",
]


def load_tokenizer() -> Any:
    """A fresh copy of the real SmolLM2 tokenizer (tests add tokens to it, so never share one)."""
    tokenizer = AutoTokenizer.from_pretrained(resolve_model())
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def tiny_model(vocab_size: int, seed: int = 0) -> LlamaForCausalLM:
    """A random 2-layer Llama small enough to train in a test (tied embeddings, like SmolLM2)."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config)


def make_records(n: int = 16) -> list[Record]:
    """``n`` records over the made-up queries and prompts, with rewards spread over a range."""
    records = []
    for i in range(n):
        query_index, prompt_index = i % len(QUERIES), (i // len(QUERIES) + i) % len(PROMPTS)
        correct = (i * 7) % 3 != 0
        records.append(
            Record(
                task="sst2",
                query_id=f"q{query_index}",
                query=QUERIES[query_index],
                prompt=PROMPTS[prompt_index],
                prompt_source="none" if not PROMPTS[prompt_index] else f"pool:{prompt_index}",
                loop=0,
                target="test",
                correct=correct,
                reward=10.0 * correct + (i % 5) - 0.1 * i,
                prompt_mean_accuracy=0.6,
            )
        )
    return records


def save_tiny_checkpoint(directory: Any, seed: int = 0) -> str:
    """Save a tiny random Llama + the SmolLM2 tokenizer (chat template included) as a checkpoint.

    It stands in for SmolLM2 as policy base and as local target in fast tests.
    """
    tokenizer = load_tokenizer()
    model = tiny_model(len(tokenizer), seed=seed)
    model.config.pad_token_id, model.config.eos_token_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)
