"""The training forward pass: logits at the supervised positions only, and the frozen-layer cache, are exact."""

from __future__ import annotations

import pytest
import torch
from _tiny_policy import load_tokenizer, make_records, tiny_model
from transformers import GPT2Config, GPT2LMHeadModel, Qwen2Config, Qwen2ForCausalLM

from qpo_middleware.training.forward import FrozenLayerCache, frozen_layer_cache, supervised_logits
from qpo_middleware.training.policy import RewardBuckets, add_policy_tokens, build_examples, collate, qpo_loss
from qpo_middleware.training.preference import (
    preference_examples,
    preference_pairs,
    sequence_logps,
    with_reference_logps,
)
from qpo_middleware.training.trainer import TrainConfig, select_trainable, train_policy


def _tiny_qwen2(vocab_size: int) -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
                                        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=256, tie_word_embeddings=True))


def _setup(kind: str, config: TrainConfig):
    tokenizer = load_tokenizer()
    model = tiny_model(len(tokenizer)) if kind == "llama" else _tiny_qwen2(len(tokenizer))
    fmt = add_policy_tokens(model, tokenizer, config.num_buckets, config.query_max_tokens, config.prompt_max_tokens)
    records = make_records(16)
    buckets = RewardBuckets.from_rewards([r.reward for r in records], config.num_buckets)
    return model, tokenizer, fmt, records, build_examples(records, tokenizer, fmt, buckets)


def _top_grads(model, loss) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss.backward()
    return [p.grad.clone() for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_supervised_logits_give_the_full_forwards_losses_and_gradients(kind):
    config = TrainConfig(num_buckets=4, trainable="top:1", device="cpu")
    model, tokenizer, _, _, examples = _setup(kind, config)
    select_trainable(model, config)
    batch = collate(examples[:6], tokenizer.pad_token_id)
    assert len({len(e.input_ids) for e in examples[:6]}) > 1  # padding in play

    full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    want_loss, want_logps = qpo_loss(full, batch["labels"]), sequence_logps(full, batch["labels"])
    want_grads = _top_grads(model, want_loss + want_logps.sum())

    cache = frozen_layer_cache(model, config)
    assert cache is not None and cache.split == model.config.num_hidden_layers - 1
    for use in (None, cache, cache):  # no cache; cache filled; cache read back
        logits, kept = supervised_logits(model, batch, use)
        assert logits.shape[1] < full.shape[1]  # fewer positions than the full forward
        loss, logps = qpo_loss(logits, kept["labels"]), sequence_logps(logits, kept["labels"])
        torch.testing.assert_close(loss, want_loss, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(logps, want_logps, atol=1e-4, rtol=1e-5)
        for got, want in zip(_top_grads(model, loss + logps.sum()), want_grads, strict=True):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert cache.misses == 6 and cache.hits == 6 and cache.bytes > 0
    # The cache's shells leave the model's own stack alone.
    assert len(model.base_model.layers) == model.config.num_hidden_layers


def test_a_full_cache_stays_exact_and_keeps_nothing_more():
    config = TrainConfig(num_buckets=4, trainable="top:1", device="cpu")
    model, tokenizer, _, _, examples = _setup("llama", config)
    batch = collate(examples[:4], tokenizer.pad_token_id)
    want, kept = supervised_logits(model, batch)
    supervised = kept["labels"][:, 1:] != -100  # (pad positions differ: the cache pads hidden states with 0)
    cache = FrozenLayerCache(model, top=1, max_bytes=0)
    for _ in range(2):
        got, _ = supervised_logits(model, batch, cache)
        torch.testing.assert_close(got[:, :-1][supervised], want[:, :-1][supervised], atol=1e-5, rtol=1e-5)
    assert cache.bytes == 0 and cache.hits == 0 and cache.misses == 8


def test_training_with_the_cache_matches_training_without_it(tmp_path):
    config = TrainConfig(epochs=3, batch_size=4, learning_rate=3e-3, num_buckets=4, device="cpu",
                         trainable="top:1", save_checkpoints=False)
    trained = []
    for gib in (0.0, 1.0):
        model, tokenizer, _, _, examples = _setup("llama", config)
        run = TrainConfig(**{**config.__dict__, "frozen_layer_cache_gib": gib})
        cache = frozen_layer_cache(model, run)
        assert (cache is None) == (gib == 0)
        result = train_policy(model, tokenizer, examples, run, tmp_path, cache=cache)
        trained.append((result, dict(model.named_parameters())))
        if cache is not None:  # every sequence's frozen layers ran in epoch 1 only
            assert cache.misses + cache.hits == 3 * len(examples)
            assert cache.misses <= len(examples)
    (plain, plain_params), (cached, cached_params) = trained
    assert cached.epoch_losses == pytest.approx(plain.epoch_losses, abs=1e-5)
    for name, param in plain_params.items():
        torch.testing.assert_close(cached_params[name], param, atol=1e-5, rtol=1e-4)


def test_the_reference_pass_fills_the_cache_for_the_preference_fine_tune(tmp_path):
    from qpo_middleware.training.preference import PreferenceObjective

    config = TrainConfig(epochs=2, batch_size=2, learning_rate=1e-3, num_buckets=4, device="cpu",
                         trainable="top:1", save_checkpoints=False)
    model, tokenizer, fmt, records, _ = _setup("llama", config)
    examples = preference_examples(preference_pairs(records, 2), tokenizer, fmt)
    assert examples
    plain = with_reference_logps(model, examples, tokenizer.pad_token_id)
    cache = frozen_layer_cache(model, config)
    cached = with_reference_logps(model, examples, tokenizer.pad_token_id, cache=cache)
    for a, b in zip(plain, cached, strict=True):
        assert a.ref_chosen == pytest.approx(b.ref_chosen, abs=1e-4)
        assert a.ref_rejected == pytest.approx(b.ref_rejected, abs=1e-4)
    computed = cache.misses
    train_policy(model, tokenizer, cached, config, tmp_path, objective=PreferenceObjective(), cache=cache)
    assert cache.misses == computed  # the fine-tune ran no frozen layer again
    assert cache.hits >= 2 * 2 * len(examples)


@pytest.mark.parametrize(
    ("changes", "why"),
    [
        ({"trainable": "all"}, "every layer trains"),
        ({"train_policy_tokens": True}, "embedding rows train"),
        ({"frozen_layer_cache_gib": 0.0}, "turned off"),
        ({"trainable": "top:2"}, "no frozen layer"),
    ],
)
def test_no_cache_where_it_would_not_be_exact(changes, why):
    tokenizer = load_tokenizer()
    config = TrainConfig(**{"num_buckets": 4, "trainable": "top:1", **changes})
    assert frozen_layer_cache(tiny_model(len(tokenizer)), config) is None, why


def test_no_cache_for_a_model_type_it_is_not_tested_on():
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=2)).eval()
    assert frozen_layer_cache(gpt2, TrainConfig(trainable="top:1")) is None
    # The supervised-positions path still serves it (no cache).
    batch = {"input_ids": torch.tensor([[1, 2, 3, 4]]), "attention_mask": torch.ones(1, 4, dtype=torch.long),
             "labels": torch.tensor([[-100, -100, 3, 4]])}
    logits, kept = supervised_logits(gpt2, batch)
    full = gpt2(input_ids=batch["input_ids"]).logits
    torch.testing.assert_close(qpo_loss(logits, kept["labels"]), qpo_loss(full, batch["labels"]))


def test_frozen_layer_cache_gib_is_checked():
    from qpo_middleware.training.config import TrainConfigError

    with pytest.raises(TrainConfigError, match="frozen_layer_cache_gib"):
        TrainConfig(frozen_layer_cache_gib=-1)
