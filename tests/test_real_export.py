"""Real-model smoke test: export SmolLM2 with the policy's tokens; the runtime's greedy text equals torch's."""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = pytest.mark.real

QUERIES = [
    "The film was a delight from start to finish.",
    "What is 17 plus 25?",
]
MAX_NEW_TOKENS = 16


@pytest.fixture(scope="module")
def smollm2_policy(tmp_path_factory: pytest.TempPathFactory):
    torch = pytest.importorskip("torch")
    from _tiny import SEPARATOR
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qpo_middleware import PolicyFormat, Template
    from qpo_middleware.policy_format import reward_token
    from qpo_middleware.training.export import write_policy_meta
    from qpo_middleware.training.models import resolve_model

    source = resolve_model()
    tokenizer = AutoTokenizer.from_pretrained(source)
    tokenizer.add_special_tokens(
        {"additional_special_tokens": [reward_token(i) for i in range(4)] + [SEPARATOR]}
    )
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    model.resize_token_embeddings(len(tokenizer))
    model.eval()
    policy = PolicyFormat(
        reward_token_ids=tuple(tokenizer.convert_tokens_to_ids([reward_token(i) for i in range(4)])),
        separator_ids=(tokenizer.convert_tokens_to_ids(SEPARATOR),),
        eos_token_ids=(tokenizer.eos_token_id,),
        prompt_max_tokens=MAX_NEW_TOKENS,
        pad_token_id=tokenizer.pad_token_id,
    )
    checkpoint = tmp_path_factory.mktemp("smollm2") / "checkpoint"
    model.save_pretrained(checkpoint)
    tokenizer.save_pretrained(checkpoint)
    write_policy_meta(checkpoint, policy, Template(), "sst2", "smollm2-135m-instruct", "cd" * 32)
    return checkpoint, model, tokenizer, policy


def test_smollm2_export_greedy_parity(smollm2_policy, tmp_path: Path) -> None:
    from _tiny import torch_greedy

    from qpo_middleware import PromptOptimizer
    from qpo_middleware.training.export import export_bundle, read_policy_meta

    checkpoint, model, tokenizer, policy = smollm2_policy
    bundle = export_bundle(checkpoint, tmp_path / "bundle", **read_policy_meta(checkpoint))
    optimizer = PromptOptimizer.from_bundle(bundle, provider="cpu")
    assert optimizer.manifest.model.num_layers == model.config.num_hidden_layers
    assert optimizer.manifest.model.num_kv_heads == model.config.num_key_value_heads

    batch = optimizer.optimize_batch(QUERIES)
    for query, batched in zip(QUERIES, batch, strict=True):
        ids = optimizer.input_ids(query)
        expected_ids = torch_greedy(model, ids, policy, MAX_NEW_TOKENS)
        assert optimizer.generate_ids([ids])[0] == expected_ids
        expected_text = tokenizer.decode(
            [t for t in expected_ids if t not in policy.eos_token_ids], skip_special_tokens=True
        ).strip()
        result = optimizer.optimize(query)
        assert result.prompt == expected_text
        assert batched.prompt == result.prompt
        assert query in result.text
