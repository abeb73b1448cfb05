"""Smoke path on the real SmolLM2: add the policy tokens, train 3 steps of the top 2 layers, reload."""

from __future__ import annotations

import math

import pytest
import torch
from _tiny_policy import make_records
from transformers import AutoModelForCausalLM

from qpo_middleware.training.models import load_model_and_tokenizer
from qpo_middleware.training.policy import RewardBuckets, add_policy_tokens, build_examples
from qpo_middleware.training.trainer import CHECKPOINT_DIR, TrainConfig, evaluate_loss, train_policy

pytestmark = pytest.mark.real


def test_smollm2_policy_trains_top_layers(tmp_path):
    config = TrainConfig(
        epochs=1,
        batch_size=2,
        max_steps=3,
        learning_rate=5e-4,
        trainable="top:2",
        num_buckets=10,
        device="cpu",
    )
    model, tokenizer = load_model_and_tokenizer()
    fmt = add_policy_tokens(
        model, tokenizer, config.num_buckets, config.query_max_tokens, config.prompt_max_tokens
    )
    records = make_records(8)
    buckets = RewardBuckets.from_rewards([r.reward for r in records], config.num_buckets)
    examples = build_examples(records, tokenizer, fmt, buckets)
    top = model.model.layers[-1].mlp.down_proj.weight.detach().clone()
    bottom = model.model.layers[0].mlp.down_proj.weight.detach().clone()
    loss_before = evaluate_loss(model, examples, tokenizer.pad_token_id)

    result = train_policy(model, tokenizer, examples, config, tmp_path, extra_state={"policy": fmt.to_dict()})

    loss_after = evaluate_loss(model, examples, tokenizer.pad_token_id)
    assert result.steps == 3
    assert all(math.isfinite(x) for x in (result.first_loss, result.last_loss, loss_before, loss_after))
    assert 0 < loss_after < loss_before
    assert not torch.equal(model.model.layers[-1].mlp.down_proj.weight, top)
    assert torch.equal(model.model.layers[0].mlp.down_proj.weight, bottom)

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / CHECKPOINT_DIR)
    assert torch.equal(
        reloaded.model.layers[-1].mlp.down_proj.weight, model.model.layers[-1].mlp.down_proj.weight
    )
    assert reloaded.get_input_embeddings().weight.shape[0] == len(tokenizer)


def test_smollm2_frozen_layer_cache_gives_the_full_forwards_losses():
    from qpo_middleware.training.forward import frozen_layer_cache, supervised_logits
    from qpo_middleware.training.policy import collate, qpo_loss
    from qpo_middleware.training.preference import sequence_logps

    config = TrainConfig(trainable="top:4", num_buckets=10, device="cpu")
    model, tokenizer = load_model_and_tokenizer()
    fmt = add_policy_tokens(model, tokenizer, config.num_buckets, config.query_max_tokens, config.prompt_max_tokens)
    records = make_records(6)
    buckets = RewardBuckets.from_rewards([r.reward for r in records], config.num_buckets)
    batch = collate(build_examples(records, tokenizer, fmt, buckets), tokenizer.pad_token_id)
    with torch.no_grad():
        full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        cache = frozen_layer_cache(model, config)
        assert cache is not None and cache.split == model.config.num_hidden_layers - 4
        for _ in range(2):  # computed, then read back
            logits, kept = supervised_logits(model, batch, cache)
            torch.testing.assert_close(qpo_loss(logits, kept["labels"]), qpo_loss(full, batch["labels"]),
                                       atol=1e-4, rtol=1e-5)
            torch.testing.assert_close(sequence_logps(logits, kept["labels"]), sequence_logps(full, batch["labels"]),
                                       atol=1e-3, rtol=1e-5)
    assert cache.hits == cache.misses == len(records)
