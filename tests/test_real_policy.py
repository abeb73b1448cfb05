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
