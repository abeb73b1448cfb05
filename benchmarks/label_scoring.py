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

``--shared-prefix`` does the same with ``HFTarget.share_prefix`` on and off (the tokens every context of a
batch starts with, run once, against whole contexts; both length-sorted):

    python benchmarks/label_scoring.py --shared-prefix --tasks tweet_emotion,ag_news \
        --targets qwen2.5-coder-0.5b-instruct --queries 64 --out benchmarks/results/target-prefix-cpu
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


# What --batching and --shared-prefix switch on HFTarget, and the names of its off and on settings.
SWITCHES = {"sort_by_length": ("call_order", "length_sorted"), "share_prefix": ("whole_contexts", "shared_prefix")}


def measure_batching(target: HFTarget, task_name: str, queries: int, data: Path, folder: Path,
                     chunk: int = 64, switch: str = "sort_by_length") -> dict[str, Any]:
    """``target.score`` on D0's pairs, chunk by chunk, with ``target.<switch>`` off and on (alternating which
    goes first per chunk), counting the tokens each way runs through the model: length-sorted batches against
    call order, or a batch's shared prefix run once against whole contexts (both length-sorted)."""
    config = CollectConfig(task=task_name, target=target.model, queries=queries, prompts="13", prompts_per_query=5,
                           data_dir=str(data))
    run = Run.open(folder / f"{task_name}-{target.model}", config)
    pairs = run.d0_pairs(run.base_prompts())
    seconds = {True: 0.0, False: 0.0}
    fed = {True: 0, False: 0}
    scores: dict[bool, list[Any]] = {True: [], False: []}
    inner = target._label_logprobs

    def counted(contexts: list[list[int]], label_ids: list[list[int]]) -> Any:
        shared = target.prefix_to_share(contexts)
        fed[getattr(target, switch)] += shared + len(contexts) * (max(map(len, contexts)) - shared)
        return inner(contexts, label_ids)

    target._label_logprobs = counted  # type: ignore[method-assign]
    target.score(run.task, pairs[: target.batch_size])  # warm-up
    fed = {True: 0, False: 0}
    for i, start in enumerate(range(0, len(pairs), chunk)):
        for on in (True, False) if i % 2 else (False, True):
            setattr(target, switch, on)
            began = time.perf_counter()
            scores[on] += target.score(run.task, pairs[start : start + chunk])
            seconds[on] += time.perf_counter() - began
    del target._label_logprobs
    setattr(target, switch, True)
    real = sum(len(target.tokenizer(target.context_text(run.task, p), add_special_tokens=False).input_ids)
               for p in pairs)
    off, on = SWITCHES[switch]
    rates = {off: len(pairs) / seconds[False], on: len(pairs) / seconds[True]}
    return {"pairs": len(pairs), "chunk": chunk, "real_tokens": real, "switch": switch,
            "padded_tokens": {off: fed[False], on: fed[True]},  # tokens run through the model, padding included
            "pairs_per_second": rates, "speedup": rates[on] / rates[off],
            "predictions_differ": sum(a.prediction != b.prediction
                                      for a, b in zip(scores[True], scores[False], strict=True)),
            "max_abs_label_nll_difference": max(abs(a.label_nll - b.label_nll)
                                                for a, b in zip(scores[True], scores[False], strict=True))}


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(f"{task}\n{target}", r) for target, tasks in results["targets"].items() for task, r in tasks.items()]
    fig, ax = plt.subplots(figsize=(1.8 * len(rows) + 2, 4))
    names = {"call_order": "batches in call order", "length_sorted": "length-sorted batches",
             "whole_contexts": "whole contexts", "shared_prefix": "shared prefix run once per batch",
             "full_sequences": "full sequence per label", "shared_context": "shared context"}
    slow, fast = SWITCHES[results["switch"]] if results.get("switch") else ("full_sequences", "shared_context")
    slow_name, fast_name = names[slow], names[fast]
    for i, (_, r) in enumerate(rows):
        ax.bar(i - 0.2, r["pairs_per_second"][slow], 0.4, color="tab:gray", label=slow_name if i == 0 else None)
        ax.bar(i + 0.2, r["pairs_per_second"][fast], 0.4, color="tab:blue", label=fast_name if i == 0 else None)
        ax.text(i + 0.2, r["pairs_per_second"][fast], f"{r['speedup']:.2f}x", ha="center", va="bottom")
    ax.set_xticks(range(len(rows)), [name for name, _ in rows], fontsize=8)
    ax.set_ylabel("pairs / second")
    ax.set_title("Target scoring: D0 pairs" if results.get("switch") else "Target label scoring")
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
    parser.add_argument("--shared-prefix", action="store_true",
                        help="time a batch's shared prefix run once against whole contexts on D0's pairs instead")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/label-scoring-cpu"))
    args = parser.parse_args(argv)
    if args.batching and args.shared_prefix:
        parser.error("--batching and --shared-prefix each time one switch; give one of them.")
    switch = "sort_by_length" if args.batching else "share_prefix" if args.shared_prefix else None
    data = resolve_data_dir()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    results: dict[str, Any] = {"command": "python " + " ".join([sys.argv[0], *(argv or sys.argv[1:])]),
                               "commit": commit, "environment": environment(), "batch_size": args.batch_size,
                               "batching": args.batching, "switch": switch,
                               "targets": {}}
    with tempfile.TemporaryDirectory() as folder:
        for name in args.targets.split(","):
            target = HFTarget(model=name, batch_size=args.batch_size)
            for task_name in args.tasks.split(","):
                if switch:
                    row = measure_batching(target, task_name, args.queries, data, Path(folder), switch=switch)
                    results["targets"].setdefault(name, {})[task_name] = row
                    off, on = SWITCHES[switch]
                    print(f"{name} {task_name}: {row['pairs_per_second'][off]:.2f} -> "
                          f"{row['pairs_per_second'][on]:.2f} pairs/s ({row['speedup']:.2f}x); "
                          f"tokens run {row['padded_tokens']} of {row['real_tokens']} real", flush=True)
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
