"""Train the tiny test policy for a few steps; run by ``accelerate launch`` from tests/test_trainer.py.

Usage: ``accelerate launch --num_processes 2 --cpu tests/_accelerate_train.py OUTPUT_DIR``.
The main process writes ``OUTPUT_DIR/result.json``; every process writes
``OUTPUT_DIR/rank<i>.json`` with its view of the run and a parameter checksum
(DDP must keep all processes' weights identical).
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import asdict
from pathlib import Path

import torch
from _tiny_policy import load_tokenizer, make_records, tiny_model
from accelerate import PartialState

from qpo_middleware.training.policy import RewardBuckets, add_policy_tokens, build_examples
from qpo_middleware.training.trainer import TrainConfig, train_policy


def main(output_dir: Path) -> None:
    logging.basicConfig(level=logging.INFO)
    tokenizer = load_tokenizer()
    model = tiny_model(len(tokenizer))
    config = TrainConfig(epochs=2, batch_size=2, learning_rate=3e-3, num_buckets=4, device="cpu", seed=1)
    fmt = add_policy_tokens(model, tokenizer, config.num_buckets)
    records = make_records(12)
    buckets = RewardBuckets.from_rewards([r.reward for r in records], config.num_buckets)
    examples = build_examples(records, tokenizer, fmt, buckets)
    result = train_policy(model, tokenizer, examples, config, output_dir)

    state = PartialState()
    checksum = float(sum(p.detach().double().sum() for p in model.parameters()))
    view = {
        "rank": state.process_index,
        "world": state.num_processes,
        "steps": result.steps,
        "checksum": checksum,
    }
    (output_dir / f"rank{state.process_index}.json").write_text(json.dumps(view))
    if state.is_main_process:
        (output_dir / "result.json").write_text(json.dumps(asdict(result), default=str))
    state.wait_for_everyone()
    assert torch.isfinite(torch.tensor(result.last_loss))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
