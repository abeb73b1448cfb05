"""Label scoring speed: shared-context scoring (HFTarget today) against one full sequence per (pair, label).

For each task, the same pairs (real queries x three prompts) are tokenized once and scored in batches the
way ``HFTarget`` does, by both methods, alternating per batch so machine load hits both alike; the script
reports pairs per second for each, the speed-up and the largest difference in label log-probability.

    python benchmarks/label_scoring.py --out benchmarks/results/label-scoring-cpu

Tasks: sst2 (single-token labels), ag_news, tweet_emotion (multi-token labels on SmolLM2) and a
6-label user task with multi-token label words (TREC's question types as labels, written as a user task
file over real GSM8K questions; its labels are for timing only, so no accuracy is reported).
Writes ``OUT/results.json`` (command, commit, hardware) and ``OUT/pairs_per_second.png``.

``--batching`` instead times ``HFTarget.score`` itself on D0's own pairs (``QUERIES`` train queries x 5 of
the 13 pool prompts, in collect's order and chunks of 64) with length-sorted batches against batches in call
order, alternating per chunk, and counts the padded tokens each way:

    python benchmarks/label_scoring.py --batching --tasks ag_news --targets qwen2.5-coder-0.5b-instruct \
        --queries 64 --out benchmarks/results/target-batching-cpu
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from qpo_bench.environment import environment
from qpo_bench.label_scoring import full_sequence_label_logprobs
from qpo_middleware.training.config import CollectConfig
from qpo_middleware.training.hf_target import HFTarget
from qpo_middleware.training.io import atomic_write_json
from qpo_middleware.training.run import Run
from qpo_middleware.training.targets import Pair
from qpo_middleware.training.tasks import Task, TaskSpec, get_task, resolve_data_dir

PROMPTS = ["", "Classify the text below.",
           "Read the text carefully and answer with exactly one of the label words, nothing else."]
TREC_LABELS = ("abbreviation", "description", "entity", "human being", "location", "numeric value")


def six_label_task(folder: Path, data: Path) -> Task:
    """A user task file (JSONL + task.json) with six multi-token label words over real GSM8K questions."""
    questions = [json.loads(line)["question"] for line in (data / "gsm8k" / "train.jsonl").open(encoding="utf-8")]
    with (folder / "questions.jsonl").open("w", encoding="utf-8") as f:
        for i, q in enumerate(questions[:400]):
            f.write(json.dumps({"question": q, "label": TREC_LABELS[i % 6]}) + "\n")
    spec = {"name": "six_labels", "file": "questions.jsonl", "query_fields": ["question"], "labels": TREC_LABELS,
            "split_field": None}
    (folder / "task.json").write_text(json.dumps(spec), encoding="utf-8")
    return TaskSpec.from_file(folder / "task.json").to_task()


def measure(target: HFTarget, task: Task, queries: int, batch_size: int, data: Path) -> dict[str, Any]:
    examples = task.splits(data, seed=0, n_train=queries, n_collect=0, n_test=0).train
    pairs = [Pair(e, p) for e in examples for p in PROMPTS]
    contexts = [target.tokenizer(target.context_text(task, p), add_special_tokens=False).input_ids for p in pairs]
    label_ids = target.label_token_ids(task)
    batches = [contexts[i : i + batch_size] for i in range(0, len(contexts), batch_size)]
    target._label_logprobs(batches[0], label_ids)  # warm-up
    full_sequence_label_logprobs(target, batches[0], label_ids)
    seconds = {"shared_context": 0.0, "full_sequences": 0.0}
    gap = 0.0
    for batch in batches:
        start = time.perf_counter()
        shared = target._label_logprobs(batch, label_ids)
        seconds["shared_context"] += time.perf_counter() - start
        start = time.perf_counter()
        reference = full_sequence_label_logprobs(target, batch, label_ids)
        seconds["full_sequences"] += time.perf_counter() - start
        gap = max(gap, float((shared - reference).abs().max()))
    rates = {k: len(pairs) / v for k, v in seconds.items()}
    return {"pairs": len(pairs), "label_tokens": [len(i) for i in label_ids],
            "mean_context_tokens": sum(map(len, contexts)) / len(contexts),
            "pairs_per_second": rates, "speedup": rates["shared_context"] / rates["full_sequences"],
            "max_abs_logprob_difference": gap}


def measure_batching(target: HFTarget, task_name: str, queries: int, data: Path, folder: Path,
                     chunk: int = 64) -> dict[str, Any]:
    """``target.score`` on D0's pairs, chunk by chunk, with length-sorted batches and in call order."""
    config = CollectConfig(task=task_name, target=target.model, queries=queries, prompts="13", prompts_per_query=5,
                           data_dir=str(data))
    run = Run.open(folder / f"{task_name}-{target.model}", config)
    pairs = run.d0_pairs(run.base_prompts())
    seconds = {True: 0.0, False: 0.0}
    padded = {True: 0, False: 0}
    predictions: dict[bool, list[str]] = {True: [], False: []}
    inner = target._label_logprobs

    def counted(contexts: list[list[int]], label_ids: list[list[int]]) -> Any:
        padded[target.sort_by_length] += len(contexts) * max(map(len, contexts))
        return inner(contexts, label_ids)

    target._label_logprobs = counted  # type: ignore[method-assign]
    target.score(run.task, pairs[: target.batch_size])  # warm-up
    padded = {True: 0, False: 0}
    for i, start in enumerate(range(0, len(pairs), chunk)):
        for sort in (True, False) if i % 2 else (False, True):
            target.sort_by_length = sort
            began = time.perf_counter()
            predictions[sort] += [s.prediction for s in target.score(run.task, pairs[start : start + chunk])]
            seconds[sort] += time.perf_counter() - began
    del target._label_logprobs
    target.sort_by_length = True
    real = sum(len(target.tokenizer(target.context_text(run.task, p), add_special_tokens=False).input_ids)
               for p in pairs)
    rates = {"call_order": len(pairs) / seconds[False], "length_sorted": len(pairs) / seconds[True]}
    return {"pairs": len(pairs), "chunk": chunk, "real_tokens": real,
            "padded_tokens": {"call_order": padded[False], "length_sorted": padded[True]},
            "pairs_per_second": rates, "speedup": rates["length_sorted"] / rates["call_order"],
            "predictions_differ": sum(a != b for a, b in zip(predictions[True], predictions[False], strict=True))}


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(f"{task}\n{target}", r) for target, tasks in results["targets"].items() for task, r in tasks.items()]
    fig, ax = plt.subplots(figsize=(1.8 * len(rows) + 2, 4))
    (slow, slow_name), (fast, fast_name) = ((("call_order", "batches in call order"),
                                             ("length_sorted", "length-sorted batches")) if results.get("batching")
                                            else (("full_sequences", "full sequence per label"),
                                                  ("shared_context", "shared context")))
    for i, (_, r) in enumerate(rows):
        ax.bar(i - 0.2, r["pairs_per_second"][slow], 0.4, color="tab:gray", label=slow_name if i == 0 else None)
        ax.bar(i + 0.2, r["pairs_per_second"][fast], 0.4, color="tab:blue", label=fast_name if i == 0 else None)
        ax.text(i + 0.2, r["pairs_per_second"][fast], f"{r['speedup']:.2f}x", ha="center", va="bottom")
    ax.set_xticks(range(len(rows)), [name for name, _ in rows], fontsize=8)
    ax.set_ylabel("pairs / second")
    ax.set_title("Target scoring: D0 pairs" if results.get("batching") else "Target label scoring")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default="sst2,ag_news,tweet_emotion,six_labels")
    parser.add_argument("--targets", default="smollm2-135m-instruct")
    parser.add_argument("--queries", type=int, default=32, help="queries per task (x 3 prompts = pairs)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--batching", action="store_true",
                        help="time length-sorted batches against call order on D0's pairs instead")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/label-scoring-cpu"))
    args = parser.parse_args(argv)
    data = resolve_data_dir()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    results: dict[str, Any] = {"command": "python " + " ".join([sys.argv[0], *(argv or sys.argv[1:])]),
                               "commit": commit, "environment": environment(), "batch_size": args.batch_size,
                               "batching": args.batching,
                               "targets": {}}
    with tempfile.TemporaryDirectory() as folder:
        for name in args.targets.split(","):
            target = HFTarget(model=name, batch_size=args.batch_size)
            for task_name in args.tasks.split(","):
                if args.batching:
                    row = measure_batching(target, task_name, args.queries, data, Path(folder))
                    results["targets"].setdefault(name, {})[task_name] = row
                    print(f"{name} {task_name}: {row['pairs_per_second']['call_order']:.2f} -> "
                          f"{row['pairs_per_second']['length_sorted']:.2f} pairs/s ({row['speedup']:.2f}x); "
                          f"padded tokens {row['padded_tokens']} of {row['real_tokens']} real", flush=True)
                    continue
                task = six_label_task(Path(folder), data) if task_name == "six_labels" else get_task(task_name)
                row = measure(target, task, args.queries, args.batch_size, data)
                results["targets"].setdefault(name, {})[task_name] = row
                print(f"{name} {task_name}: {row['pairs_per_second']['full_sequences']:.2f} -> "
                      f"{row['pairs_per_second']['shared_context']:.2f} pairs/s ({row['speedup']:.1f}x), "
                      f"max |diff| {row['max_abs_logprob_difference']:.1e}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out / "results.json", results)
    plot(results, args.out / "pairs_per_second.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
