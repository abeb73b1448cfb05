"""Helpers for the export/runtime tests: a tiny random Llama with the real SmolLM2 tokenizer, exported.

A module (not a conftest) so several test files, and subprocesses, can use it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

SEPARATOR = "<|qpo_prompt|>"
NUM_BUCKETS = 4
PROMPT_MAX_TOKENS = 12
FAKE_DATA_SHA256 = "ab" * 32

QUERIES = [
    "Is this movie any good?",
    "a",
    "The film was a complete waste of two hours and I want them back, every minute of them.",
    "Quiet, moving, and honest.",
    "Ünïcødé query — with “quotes” and emoji 🎬",
]


@dataclass
class TinyPolicy:
    checkpoint: Path
    model: Any  # LlamaForCausalLM (eval mode)
    tokenizer: Any  # PreTrainedTokenizerFast with the policy's special tokens
    policy: Any  # PolicyFormat


def build_checkpoint(
    directory: Path, *, seed: int = 0, extra_eos_from_query: str | None = QUERIES[0]
) -> TinyPolicy:
    """Save a tiny random Llama (hidden 64, 2 layers, 4 heads, 2 KV heads) + tokenizer + qpo_policy.json.

    With ``extra_eos_from_query`` the 4th greedy token of that query also counts as EOS,
    so a random model still stops early on some rows (covers per-row stopping).
    """
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from qpo_middleware import PolicyFormat, Template
    from qpo_middleware.policy_format import reward_token
    from qpo_middleware.training.export import PolicyMeta, write_policy_meta
    from qpo_middleware.training.models import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model())
    base_vocab = len(tokenizer)
    tokenizer.add_special_tokens(
        {"additional_special_tokens": [reward_token(i) for i in range(NUM_BUCKETS)] + [SEPARATOR]}
    )
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=base_vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        initializer_range=0.3,  # larger than default so greedy text varies instead of repeating one token
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    model = LlamaForCausalLM(config)
    model.resize_token_embeddings(len(tokenizer))
    model.eval()

    policy = PolicyFormat(
        reward_token_ids=tuple(
            tokenizer.convert_tokens_to_ids([reward_token(i) for i in range(NUM_BUCKETS)])
        ),
        separator_ids=(tokenizer.convert_tokens_to_ids(SEPARATOR),),
        eos_token_ids=(tokenizer.eos_token_id,),
        prompt_max_tokens=PROMPT_MAX_TOKENS,
        pad_token_id=tokenizer.pad_token_id,
    )
    if extra_eos_from_query is not None:
        ids = policy.input_ids(tokenizer(extra_eos_from_query, add_special_tokens=False).input_ids)
        generated = torch_greedy(model, ids, policy, PROMPT_MAX_TOKENS)
        policy = PolicyFormat.from_dict(
            {**policy.to_dict(), "eos_token_ids": [tokenizer.eos_token_id, generated[3]]}
        )
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    write_policy_meta(directory, PolicyMeta(policy, Template(), "sst2", "tiny-llama", FAKE_DATA_SHA256))
    return TinyPolicy(checkpoint=directory, model=model, tokenizer=tokenizer, policy=policy)


def suppress_ids(policy: Any) -> list[int]:
    """The ids the exported bundle suppresses by default (reward and separator tokens)."""
    return sorted({*policy.reward_token_ids, *policy.separator_ids} - set(policy.eos_token_ids))


def torch_greedy(model: Any, input_ids: list[int], policy: Any, max_new_tokens: int) -> list[int]:
    """Reference decode with transformers ``generate`` (greedy, same stop ids and suppressed tokens)."""
    import torch

    ids = torch.tensor([input_ids])
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=list(policy.eos_token_ids),
            pad_token_id=policy.pad_token_id,
            suppress_tokens=suppress_ids(policy),
        )
    return out[0, len(input_ids) :].tolist()


def export_tiny(tiny: TinyPolicy, out: Path, **kwargs: Any) -> Path:
    from qpo_middleware.training.export import export_bundle

    return export_bundle(tiny.checkpoint, out, **kwargs)
