"""Preference fine-tune speed on the real SmolLM2 policy: the training forward pass before and after.

The preference step of the default recipe (``dpo_only``: a reference pass, then DPO epochs with
``trainable="top:4"``) on the same pairs, three ways, one after the other:

- ``full``: every position's logits and every layer, each epoch (the forward pass before
  ``training/forward.py``; patched back in here for the comparison);
- ``positions``: logits at the supervised positions only (``frozen_layer_cache_gib=0``);
- ``cached``: that, and the frozen layers run once per sequence, shared by the reference pass and every
  epoch (the default).

Pairs are real queries of the task with two prompts of its pool drawn at random (which prompt is "chosen"
does not change the cost, so no target is called). The script reports seconds for the reference pass and the
fine-tune, the speed-up, and how far the runs' losses and reference log-probabilities drift apart.

    python benchmarks/train_speed.py --task ag_news --pairs 256 --out benchmarks/results/train-speed-cpu

Writes ``OUT/results.json`` (command, commit, hardware) and ``OUT/seconds.png``.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from qpo_bench.environment import code_version, environment
from qpo_middleware.training import preference as preference_module
from qpo_middleware.training import trainer as trainer_module
from qpo_middleware.training.config import TrainConfig
from qpo_middleware.training.dataset import Record
from qpo_middleware.training.forward import frozen_layer_cache
from qpo_middleware.training.io import atomic_write_json
from qpo_middleware.training.models import load_model_and_tokenizer
from qpo_middleware.training.policy import add_policy_tokens
from qpo_middleware.training.preference import (
    PreferenceObjective,
    PreferencePair,
    preference_examples,
    with_reference_logps,
)
from qpo_middleware.training.tasks import get_task, load_prompt_pool, resolve_data_dir

MODES = ("full", "positions", "cached")


def _full_logits(model: Any, batch: dict[str, torch.Tensor], cache: Any = None) -> tuple[torch.Tensor, dict]:
    """The forward pass before training/forward.py: every position, every layer."""
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, batch


def make_pairs(task_name: str, n: int, seed: int) -> list[PreferencePair]:
    task = get_task(task_name)
    examples = task.splits(resolve_data_dir(), seed=seed, n_train=n, n_collect=0, n_test=0).train
    pool = [p["text"] for p in load_prompt_pool(task_name)]
    rng = random.Random(seed)

    def record(i: int, prompt: str, correct: bool) -> Record:
        return Record(task=task_name, query_id=examples[i].id, query=examples[i].query, prompt=prompt,
                      prompt_source="pool", loop=0, target="none", correct=correct, reward=float(correct),
                      prompt_mean_accuracy=0.5)

    pairs = []
    for i in range(len(examples)):
        chosen, rejected = rng.sample(pool, 2)
        pairs.append(PreferencePair(record(i, chosen, True), record(i, rejected, False)))
    return pairs


def run_mode(mode: str, pairs: list[PreferencePair], config: TrainConfig) -> dict[str, Any]:
    model, tokenizer = load_model_and_tokenizer()
    fmt = add_policy_tokens(model, tokenizer, config.num_buckets, config.query_max_tokens, config.prompt_max_tokens)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    examples = preference_examples(pairs, tokenizer, fmt)
    run = replace(config, frozen_layer_cache_gib=config.frozen_layer_cache_gib if mode == "cached" else 0.0)
    patched = {}
    if mode == "full":
        patched = {m: m.supervised_logits for m in (trainer_module, preference_module)}
        for m in patched:
            m.supervised_logits = _full_logits
    try:
        torch.manual_seed(0)
        start = time.perf_counter()
        cache = frozen_layer_cache(model, run)
        examples = with_reference_logps(model, examples, pad_id, batch_size=16, cache=cache)
        reference_seconds = time.perf_counter() - start
        with tempfile.TemporaryDirectory() as out:
            result = trainer_module.train_policy(model, tokenizer, examples, run, out, objective=PreferenceObjective(),
                                                 cache=cache)
    finally:
        for m, original in patched.items():
            m.supervised_logits = original
    return {"reference_seconds": reference_seconds, "train_seconds": result.seconds,
            "total_seconds": reference_seconds + result.seconds, "epoch_losses": result.epoch_losses,
            "reference_logps": [e.ref_chosen for e in examples] + [e.ref_rejected for e in examples],
            "cache": None if cache is None else {"computed": cache.misses, "reused": cache.hits,
                                                 "mib": cache.bytes / 2**20}}


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(results["modes"])
    reference = [results["modes"][m]["reference_seconds"] for m in modes]
    train = [results["modes"][m]["train_seconds"] for m in modes]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(modes, reference, label="reference pass")
    ax.bar(modes, train, bottom=reference, label=f"fine-tune ({results['settings']['epochs']} epochs)")
    ax.set_ylabel("seconds")
    ax.set_title(f"DPO step, {results['pairs']} pairs, SmolLM2 top:{results['settings']['top']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="ag_news")
    parser.add_argument("--pairs", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--trainable", default="top:4")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/train-speed-cpu"))
    args = parser.parse_args(argv)
    modes = args.modes.split(",")
    if unknown := set(modes) - set(MODES):
        parser.error(f"--modes takes {', '.join(MODES)}; got {', '.join(sorted(unknown))}")
    # The default recipe's preference step (benchmarks/qpo_bench/offline.py dpo_only).
    config = TrainConfig(epochs=args.epochs, batch_size=8, learning_rate=1e-4, trainable=args.trainable,
                         device="cpu", num_buckets=10, save_checkpoints=False, query_max_tokens=40,
                         prompt_max_tokens=32)
    results: dict[str, Any] = {"benchmark": "train_speed",
                               "command": "python " + " ".join([sys.argv[0], *(argv or sys.argv[1:])]),
                               **code_version(), "environment": environment(), "task": args.task,
                               "pairs": args.pairs, "threads": torch.get_num_threads(),
                               "settings": {"epochs": args.epochs, "top": config.top_layers, "batch_size": 8},
                               "modes": {}}
    pairs = make_pairs(args.task, args.pairs, args.seed)
    for mode in modes:
        results["modes"][mode] = run_mode(mode, pairs, config)
        row = results["modes"][mode]
        print(f"{mode}: reference {row['reference_seconds']:.1f} s, fine-tune {row['train_seconds']:.1f} s, "
              f"losses {[round(x, 4) for x in row['epoch_losses']]}", flush=True)
    if "full" in results["modes"]:
        base = results["modes"]["full"]
        for row in results["modes"].values():
            row["speedup"] = base["total_seconds"] / row["total_seconds"]
            row["max_reference_logp_difference"] = max(
                abs(a - b) for a, b in zip(row["reference_logps"], base["reference_logps"], strict=True))
            row["max_epoch_loss_difference"] = max(
                abs(a - b) for a, b in zip(row["epoch_losses"], base["epoch_losses"], strict=True))
    for row in results["modes"].values():
        del row["reference_logps"]
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out / "results.json", results)
    plot(results, args.out / "seconds.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
