"""Re-check a CPU-profile run on fresh held-out queries, and try loop-1 variants there.

A quality run scores 100 test queries per task; its settings may have been chosen on them. This
script takes the *next* N queries of the same seeded test split (never seen by the run's
collect, loops or benchmark), and scores on them: the best pool prompt, and the greedy prompts of
a policy that is either a loop checkpoint of the run or a loop-1 variant trained here from the
base model on the run's D0. Decoding may add reward guidance: log p(.|top bucket) + w *
(log p(.|top bucket) - log p(.|bucket 0)), which favours prompts the policy ties to a high reward
*for this query* over its query-independent favourites (w = 0 is plain greedy).

Usage::

    python benchmarks/fresh_queries.py RUN_DIR --checkpoint loop_1 --guidance 0,3 --extra 300
    python benchmarks/fresh_queries.py RUN_DIR --train top1 --epochs 8 --work /tmp/fresh

``--train floor`` trains on D0 at or above its median reward (what loop 1 does), ``top1`` on each
train query's best correct pair. One JSON line per (policy, guidance) is printed and appended to
``WORK/fresh_queries.jsonl``. Slow on CPU: ~1 min to decode 300 queries, ~1 min per 300 target calls.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any


def train_variant(run: Any, variant: str, epochs: int, work: Path) -> tuple[Any, Any, Any]:
    from qpo_middleware.stats import quantile
    from qpo_middleware.training.config import TrainConfig
    from qpo_middleware.training.loops import fixed_buckets, load_policy
    from qpo_middleware.training.policy import build_examples
    from qpo_middleware.training.trainer import train_policy

    d0 = run.dataset().loop(0)
    if variant == "floor":
        floor = quantile([r.reward for r in d0], 0.5)
        records = [r for r in d0 if r.reward >= floor]
    else:  # top1: each train query's best correct pair
        best: dict[str, Any] = {}
        for r in d0:
            if r.correct and (r.query_id not in best or r.reward > best[r.query_id].reward):
                best[r.query_id] = r
        records = list(best.values())
    # The CPU profile's loop-1 settings.
    train = TrainConfig(epochs=epochs, learning_rate=2e-4, batch_size=8, trainable="top:4", prompt_max_tokens=32,
                        query_max_tokens=40, seed=run.config.seed)
    buckets = fixed_buckets(run.paths, d0, train.num_buckets)
    model, tokenizer, fmt = load_policy(run.config.target, train)
    examples = build_examples(records, tokenizer, fmt, buckets, include_empty=train.include_empty)
    train_policy(model, tokenizer, examples, train, work / f"{variant}-e{epochs}")
    return model, tokenizer, fmt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="A run directory of benchmarks/quality.py (RESULTS/runs/<task>-...).")
    parser.add_argument("--checkpoint", default="loop_1", help="Loop checkpoint to evaluate (loop_<t>).")
    parser.add_argument("--train", choices=("floor", "top1"), default=None, help="Train a loop-1 variant instead.")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--guidance", default="0", help="Comma-separated reward-guidance weights w.")
    parser.add_argument("--extra", type=int, default=300, help="Fresh test queries (after the run's own).")
    parser.add_argument("--work", type=Path, default=Path("/tmp/qpo-fresh"))
    args = parser.parse_args(argv)

    from qpo_middleware.bundle import GenerationConfig
    from qpo_middleware.stats import paired_bootstrap_ci
    from qpo_middleware.training.evaluate import best_train_prompt, hits_of, score_prompts
    from qpo_middleware.training.export import read_policy_meta
    from qpo_middleware.training.models import load_model_and_tokenizer
    from qpo_middleware.training.run import Run
    from qpo_middleware.training.sampling import generate_prompts

    run = Run.open(args.run)
    task, config = run.task, run.config
    splits = task.splits(seed=config.seed, n_train=config.queries, n_collect=config.collect_queries,
                         n_test=config.test_queries + args.extra)
    fresh = splits.test[config.test_queries :]
    if {e.query for e in fresh} & {e.query for e in run.splits.test}:
        raise SystemExit("The fresh queries overlap the run's test split; the split function changed.")
    args.work.mkdir(parents=True, exist_ok=True)
    if args.train:
        model, tokenizer, fmt = train_variant(run, args.train, args.epochs, args.work)
        policy = f"train {args.train}, {args.epochs} epochs"
    else:
        checkpoint = run.paths.checkpoint(int(args.checkpoint.removeprefix("loop_")))
        model, tokenizer = load_model_and_tokenizer(checkpoint)
        fmt = read_policy_meta(checkpoint).policy
        policy = args.checkpoint

    target = run.make_target()
    _, best_text, _ = best_train_prompt(run)

    def hits(prompts: list[str], source: str) -> list[bool | None]:
        return hits_of(score_prompts(run, target, fresh, prompts, source))

    def accuracy(values: list[bool | None]) -> float:
        valid = [v for v in values if v is not None]
        return sum(valid) / max(1, len(valid))

    best = hits([best_text] * len(fresh), "best_pool")
    for weight in (float(w) for w in args.guidance.split(",")):
        started = time.perf_counter()
        rows = generate_prompts(model, tokenizer, fmt, [e.query for e in fresh], GenerationConfig.for_policy(fmt),
                                guidance=weight, guidance_bucket=0)  # greedy; w = 0 is plain greedy
        prompts = [row[0] for row in rows]
        qpo = hits(prompts, "policy")
        diff, low, high, _ = paired_bootstrap_ci(qpo, best, samples=2000, seed=0)
        by_label: dict[str, list[bool | None]] = {}
        for example, hit in zip(fresh, qpo, strict=True):
            by_label.setdefault(task.gold_text(example), []).append(hit)
        row = {"run": str(args.run), "task": task.name, "policy": policy, "guidance": weight, "queries": len(fresh),
               "qpo": accuracy(qpo), "best_pool": accuracy(best), "best_pool_prompt": best_text,
               "gap": [round(diff, 4), round(low, 4), round(high, 4)],
               "qpo_by_label": {k: round(accuracy(v), 4) for k, v in sorted(by_label.items())},
               "distinct_prompts": len(set(prompts)), "top_prompts": Counter(prompts).most_common(4),
               "seconds": round(time.perf_counter() - started, 1)}
        print(json.dumps(row), flush=True)
        with (args.work / "fresh_queries.jsonl").open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
