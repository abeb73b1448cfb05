"""The policy training loop on a tiny random Llama with the real SmolLM2 tokenizer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _tiny_policy import load_tokenizer, make_records, tiny_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from qpo_middleware.training.policy import RewardBuckets, add_policy_tokens, build_examples
from qpo_middleware.training.trainer import (
    CHECKPOINT_DIR,
    TRAINER_STATE_FILE,
    TrainConfig,
    TrainConfigError,
    epoch_batches,
    evaluate_loss,
    lr_factor,
    train_policy,
)

TESTS = Path(__file__).parent


def _setup(config: TrainConfig, n_records: int = 16):
    tokenizer = load_tokenizer()
    model = tiny_model(len(tokenizer))
    fmt = add_policy_tokens(
        model, tokenizer, config.num_buckets, config.query_max_tokens, config.prompt_max_tokens
    )
    records = make_records(n_records)
    buckets = RewardBuckets.from_rewards([r.reward for r in records], config.num_buckets)
    examples = build_examples(records, tokenizer, fmt, buckets)
    return model, tokenizer, fmt, buckets, examples


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


# --- config and schedule --------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("epochs", 0, "epochs"),
        ("learning_rate", 0.0, "learning_rate"),
        ("warmup_ratio", 1.0, "warmup_ratio"),
        ("lr_schedule", "step", "lr_schedule"),
        ("trainable", "top:0", "top:N"),
        ("trainable", "bottom:2", "top:N"),
        ("device", "tpu", "device"),
        ("max_steps", 0, "max_steps"),
        ("max_grad_norm", -1.0, "max_grad_norm"),
    ],
)
def test_config_validation_names_the_field(field, value, message):
    with pytest.raises(TrainConfigError, match=message):
        TrainConfig(**{field: value})


def test_every_config_field_has_help():
    from dataclasses import fields

    assert all(f.metadata.get("help") for f in fields(TrainConfig))
    assert TrainConfig(trainable="top:6").top_layers == 6 and TrainConfig().top_layers is None


def test_lr_schedule_warms_up_then_decays():
    cosine = [lr_factor(s, 100, 10, "cosine") for s in range(100)]
    assert cosine[:10] == sorted(cosine[:10]) and cosine[9] < 1.0
    assert cosine[10] == pytest.approx(1.0)
    assert cosine[10:] == sorted(cosine[10:], reverse=True) and cosine[-1] < 0.01
    linear = [lr_factor(s, 100, 0, "linear") for s in range(100)]
    assert linear[0] == 1.0 and linear[50] == pytest.approx(0.5)
    assert lr_factor(99, 100, 10, "constant") == 1.0


def test_epoch_batches_are_seeded_and_shard_every_example():
    one = epoch_batches(10, 3, torch.Generator().manual_seed(0), 0, 1)
    again = epoch_batches(10, 3, torch.Generator().manual_seed(0), 0, 1)
    assert one == again and sorted(i for b in one for i in b) == list(range(10))
    shards = [epoch_batches(10, 3, torch.Generator().manual_seed(0), r, 3) for r in range(3)]
    assert all(len(s) == 2 for s in shards)  # 4 batches padded to 6 by wrapping around
    assert {i for s in shards for b in s for i in b} == set(range(10))


# --- training -------------------------------------------------------------------


def test_training_changes_parameters_and_lowers_the_loss(tmp_path):
    config = TrainConfig(
        epochs=3, batch_size=4, learning_rate=1e-2, num_buckets=4, device="cpu", save_checkpoints=False
    )
    model, tokenizer, _, _, examples = _setup(config)
    before = _snapshot(model)
    loss_before = evaluate_loss(model, examples, tokenizer.pad_token_id)
    steps_seen = []

    result = train_policy(
        model,
        tokenizer,
        examples,
        config,
        tmp_path,
        on_step=lambda s, total, loss: steps_seen.append((s, total)),
    )

    loss_after = evaluate_loss(model, examples, tokenizer.pad_token_id)
    assert result.steps == 12 and steps_seen == [(s, 12) for s in range(1, 13)]
    assert len(result.epoch_losses) == 3 and result.checkpoint is None
    assert loss_after < loss_before - 2.0  # about 10.8 -> 5.5
    assert result.last_loss < result.first_loss
    changed = [n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert len(changed) == len(before)  # "all": every tensor trained
    assert all(p.requires_grad for p in model.parameters()) and not model.training


def test_training_is_deterministic_given_the_seed(tmp_path):
    config = TrainConfig(
        epochs=1,
        batch_size=4,
        learning_rate=1e-3,
        num_buckets=4,
        device="cpu",
        seed=3,
        save_checkpoints=False,
    )
    results = []
    for run in ("a", "b"):
        model, tokenizer, _, _, examples = _setup(config, n_records=8)
        results.append(train_policy(model, tokenizer, examples, config, tmp_path / run))
    assert results[0].epoch_losses == results[1].epoch_losses


def test_top_layers_train_only_the_top_layers_and_final_norm(tmp_path):
    config = TrainConfig(
        epochs=2,
        batch_size=4,
        learning_rate=3e-3,
        num_buckets=4,
        device="cpu",
        trainable="top:1",
        weight_decay=0.1,
        save_checkpoints=False,
    )
    model, tokenizer, fmt, _, examples = _setup(config)
    before = _snapshot(model)
    train_policy(model, tokenizer, examples, config, tmp_path, extra_state={"policy": fmt.to_dict()})

    def same(name: str) -> bool:
        return torch.equal(dict(model.named_parameters())[name].detach(), before[name])

    lower = [n for n in before if n.startswith("model.layers.0.")]
    upper = [n for n in before if n.startswith("model.layers.1.")]
    assert lower and all(same(n) for n in lower)
    assert all(not same(n) for n in upper)
    assert not same("model.norm.weight")
    # Embeddings (policy-token rows included) stay frozen: no backward pass below the top layers.
    assert same("model.embed_tokens.weight")
    # The caller's model is handed back as it came: trainable flags restored.
    assert all(p.requires_grad for p in model.parameters())


def test_top_layers_rejects_more_layers_than_the_model_has(tmp_path):
    config = TrainConfig(epochs=1, num_buckets=4, device="cpu", trainable="top:3")
    model, tokenizer, _, _, examples = _setup(config, n_records=4)
    with pytest.raises(TrainConfigError, match="more layers"):
        train_policy(model, tokenizer, examples, config, tmp_path)


def test_checkpoint_is_written_and_reloads_as_the_trained_policy(tmp_path):
    config = TrainConfig(
        epochs=2, batch_size=8, grad_accum_steps=2, learning_rate=3e-3, num_buckets=4, device="cpu"
    )
    model, tokenizer, fmt, buckets, examples = _setup(config)
    extra = {"policy_format": fmt.to_dict(), "reward_buckets": buckets.to_dict()}
    result = train_policy(model, tokenizer, examples, config, tmp_path, extra_state=extra)

    checkpoint = tmp_path / CHECKPOINT_DIR
    assert result.checkpoint == checkpoint and result.steps == 2  # 2 micro-batches per step, 1 step per epoch
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT_DIR]  # no temp or backup dirs left
    state = json.loads((checkpoint / TRAINER_STATE_FILE).read_text())
    assert state["epoch"] == 2 and state["global_step"] == 2
    assert state["config"]["num_buckets"] == 4 and state["policy_format"] == fmt.to_dict()
    assert RewardBuckets.from_dict(state["reward_buckets"]) == buckets

    reloaded = AutoModelForCausalLM.from_pretrained(checkpoint)
    reloaded_tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    assert (
        add_policy_tokens(reloaded, reloaded_tokenizer, 4, config.query_max_tokens, config.prompt_max_tokens)
        == fmt
    )
    assert evaluate_loss(reloaded, examples, tokenizer.pad_token_id) == pytest.approx(
        evaluate_loss(model, examples, tokenizer.pad_token_id), rel=1e-5
    )


def test_accelerate_launch_two_cpu_processes(tmp_path):
    # accelerate's `--cpu` flag starts ONE process unless MPI is set up; `--multi_gpu`
    # starts N through torchrun, and on a machine without GPUs the trainer's
    # Accelerator(cpu=True) makes them one gloo (MULTI_CPU) group.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        str(TESTS / "_accelerate_train.py"), str(tmp_path),
    ]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]

    result = json.loads((tmp_path / "result.json").read_text())
    views = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert all(v["world"] == 2 for v in views)
    assert result["steps"] == 6  # 12 examples, batch 2, 2 processes: 3 steps per epoch, 2 epochs
    assert views[0]["checksum"] == pytest.approx(views[1]["checksum"], rel=1e-6)  # DDP kept them in step
    assert (tmp_path / CHECKPOINT_DIR / "model.safetensors").is_file()


def test_train_policy_tokens_trains_only_the_policy_token_rows(tmp_path):
    from qpo_middleware.training.policy import policy_token_ids

    config = TrainConfig(epochs=2, batch_size=4, learning_rate=3e-3, num_buckets=4, device="cpu",
                         trainable="top:1", weight_decay=0.1, save_checkpoints=False, train_policy_tokens=True)
    model, tokenizer, fmt, _, examples = _setup(config)
    before = _snapshot(model)
    train_policy(model, tokenizer, examples, config, tmp_path, extra_state={"policy": fmt.to_dict()})
    after = dict(model.named_parameters())
    name = "model.embed_tokens.weight"
    changed = (after[name].detach() != before[name]).any(dim=1).nonzero().flatten().tolist()
    policy_ids = set(policy_token_ids(tokenizer, config.num_buckets))
    used = {i for e in examples for i in e.input_ids} & policy_ids  # tokens that occur get gradients
    assert used and set(changed) == used  # those rows moved, and no other row (no decay either)
    lower = [n for n in before if n.startswith("model.layers.0.")]
    assert all(torch.equal(after[n].detach(), before[n]) for n in lower)
    assert all(p.requires_grad for p in model.parameters())
    assert not model.get_input_embeddings().weight._backward_hooks  # the row hook is gone
