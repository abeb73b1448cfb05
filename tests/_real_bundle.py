"""Export a real SmolLM2 policy bundle (fp32, policy tokens added, untrained) for real-model tests.

Follows ``test_real_export.py``: the embedded SmolLM2 gets the reward-bucket and
separator tokens, is saved as a checkpoint with its policy format, and goes
through ``export_bundle``. About a minute on 2 CPU cores.
"""

from __future__ import annotations

from pathlib import Path

NUM_BUCKETS = 4
PROMPT_MAX_TOKENS = 16
FAKE_DATA_SHA256 = "cd" * 32


def export_smollm2_bundle(directory: Path, *, prompt_max_tokens: int = PROMPT_MAX_TOKENS) -> Path:
    """Write ``directory/checkpoint`` and ``directory/bundle``; return the bundle directory."""
    import torch
    from _tiny import SEPARATOR
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qpo_middleware import PolicyFormat, Template
    from qpo_middleware.policy_format import reward_token
    from qpo_middleware.training.export import PolicyMeta, export_bundle, write_policy_meta
    from qpo_middleware.training.models import resolve_model

    source = resolve_model()
    tokenizer = AutoTokenizer.from_pretrained(source)
    buckets = [reward_token(i) for i in range(NUM_BUCKETS)]
    tokenizer.add_special_tokens({"additional_special_tokens": [*buckets, SEPARATOR]})
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    model.resize_token_embeddings(len(tokenizer))
    model.eval()
    policy = PolicyFormat(
        reward_token_ids=tuple(tokenizer.convert_tokens_to_ids(buckets)),
        separator_ids=(tokenizer.convert_tokens_to_ids(SEPARATOR),),
        eos_token_ids=(tokenizer.eos_token_id,),
        prompt_max_tokens=prompt_max_tokens,
        pad_token_id=tokenizer.pad_token_id,
    )
    checkpoint = directory / "checkpoint"
    model.save_pretrained(checkpoint)
    tokenizer.save_pretrained(checkpoint)
    write_policy_meta(checkpoint, PolicyMeta(policy, Template(), "sst2", "smollm2-135m-instruct", FAKE_DATA_SHA256))
    return export_bundle(checkpoint, directory / "bundle")
