"""Compare the embedded targets on the same D0: how much a prompt can do for each target LLM.

For every (task, target), ``qpo collect`` scores the same train queries with the same pool prompts
plus no instruction (same seed, so the same queries and prompts), then this script reports per
target: accuracy per prompt (min / median / max, no instruction), the best single prompt, the
per-query oracle (a query counts when any prompt gets it right), the label-routing oracle (each
gold label sent to the prompt with the best recall on it), each prompt's label lean (the share
of its predictions per label, against the gold split) and the wall time per scored pair.

    python benchmarks/targets.py --tasks sst2 --queries 150 --prompts 12 \\
        --targets smollm2-135m-instruct,qwen2.5-coder-0.5b-instruct --out benchmarks/results/targets-cpu

Writes ``OUT/results.json`` (with the command, commit and hardware), ``OUT/report.md`` and
``OUT/accuracy.png``; the runs (score caches) stay under ``OUT/runs/`` (ignored by git), so a
re-run with more tasks or targets reuses every pair already scored.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from qpo_bench.environment import environment
from qpo_middleware.training.collect import collect
from qpo_middleware.training.config import CollectConfig
from qpo_middleware.training.io import atomic_write_json
from qpo_middleware.training.run import Run


def target_stats(run_dir: Path, seconds: float, calls: int) -> dict[str, Any]:
    """The comparison figures of one collected run (its D0)."""
    records = list(Run.open(run_dir).dataset().loop(0))
    by_prompt: dict[tuple[str, str], list[Any]] = defaultdict(list)
    by_query: dict[str, list[bool]] = defaultdict(list)
    for r in records:
        by_prompt[(r.prompt_source, r.prompt)].append(r)
        by_query[r.query_id].append(r.correct)
    golds = Counter(r.label for r in {r.query_id: r for r in records}.values())  # one gold label per query
    prompts = []
    for (source, text), rs in by_prompt.items():
        predictions = Counter(r.prediction for r in rs)
        recall = {label: statistics.fmean([r.correct for r in rs if r.label == label]) for label in golds}
        prompts.append({"source": source, "prompt": text, "accuracy": statistics.fmean(r.correct for r in rs),
                        "lean": {label: predictions[label] / len(rs) for label in golds}, "recall": recall})
    prompts.sort(key=lambda p: -p["accuracy"])
    accuracies = [p["accuracy"] for p in prompts]
    n = len(by_query)
    routing = {label: max(prompts, key=lambda p: p["recall"][label]) for label in golds}
    return {
        "queries": n, "prompts": len(prompts), "pairs": len(records),
        "gold_split": {label: count / n for label, count in golds.items()},
        "accuracy_min": min(accuracies), "accuracy_median": statistics.median(accuracies),
        "accuracy_max": max(accuracies),
        "no_instruction": next((p["accuracy"] for p in prompts if p["source"] == "none"), None),
        "best_prompt": {k: prompts[0][k] for k in ("source", "prompt", "accuracy", "lean")},
        "per_query_oracle": sum(any(v) for v in by_query.values()) / n,
        "label_routing_oracle": sum(routing[label]["recall"][label] * count for label, count in golds.items()) / n,
        "label_routing": {label: p["source"] for label, p in routing.items()},
        "collect_seconds": seconds, "target_calls": calls,
        "seconds_per_pair": seconds / calls if calls else None,
        "per_prompt": prompts,
    }


def render(results: dict[str, Any]) -> str:
    lines = [f"# Targets compared on the same D0 ({results['queries']} train queries x the same prompts + no "
             "instruction)", "", "Rows: 12 prompts spread over the task's hand-written pool; rows marked [induce:N]: N "
             "instructions induced by the embedded Qwen from labelled train examples (APE-style), same queries.", "",
             f"Command (latest): `{results['command']}`; each row's own command and commit: `results.json`  ",
             f"Commit: {results['commit']}  ", f"Hardware: {results['environment'].get('cpu_model')}", ""]
    lines += ["| task | target | prompt accuracy min / median / max | no instruction | best prompt | "
              "per-query oracle | label-routing oracle | best prompt's lean vs gold | s / pair |",
              "|---|---|---|---|---|---|---|---|---|"]
    for task, per_target in results["tasks"].items():
        for target, s in per_target.items():
            best = s["best_prompt"]
            lean = ", ".join(f"{k} {v:.0%}" for k, v in best["lean"].items())
            split = ", ".join(f"{k} {v:.0%}" for k, v in s["gold_split"].items())
            lines.append(
                f"| {task} | {target} | {s['accuracy_min']:.1%} / {s['accuracy_median']:.1%} / {s['accuracy_max']:.1%} "
                f"| {s['no_instruction']:.1%} | {best['accuracy']:.1%} ({best['source']}) | {s['per_query_oracle']:.1%} "
                f"| {s['label_routing_oracle']:.1%} | {lean} (gold {split}) | {s['seconds_per_pair']:.2f} |")
    lines += ["", "Each prompt's accuracy and label lean, per task and target: `results.json` (`per_prompt`).", ""]
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(results["tasks"])
    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        for target, s in results["tasks"][task].items():
            values = sorted(p["accuracy"] for p in s["per_prompt"])
            ax.plot(range(len(values)), values, marker="o", label=f"{target} (oracle {s['per_query_oracle']:.0%})")
        ax.set_title(f"{task}: accuracy per prompt, sorted")
        ax.set_xlabel("prompt (sorted)")
        ax.set_ylabel("train accuracy")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _earlier_results(path: Path, results: dict[str, Any]) -> dict[str, Any]:
    """The results file of an earlier run into the same folder, when made with the same queries and pool."""
    if not path.exists():
        return {}
    earlier = json.loads(path.read_text(encoding="utf-8"))
    same = all(earlier.get(k) == results[k] for k in ("queries", "seed"))
    return earlier if same else {}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default="sst2")
    parser.add_argument("--targets", default="smollm2-135m-instruct,qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--queries", type=int, default=150)
    parser.add_argument("--prompts", default="12",
                        help="N pool prompts spread over the pool, or induce:N (N induced by the embedded Qwen, "
                             "reported as its own row)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/targets-cpu"))
    args = parser.parse_args(argv)

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    results: dict[str, Any] = {"command": "python " + " ".join([sys.argv[0], *(argv or sys.argv[1:])]),
                               "commit": commit, "environment": environment(), "queries": args.queries,
                               "pool_prompts": args.prompts, "seed": args.seed, "tasks": {}}
    earlier = _earlier_results(args.out / "results.json", results)
    results["tasks"] = {task: dict(per_target) for task, per_target in earlier.get("tasks", {}).items()}
    pool = "" if args.prompts.isdigit() else f" [{args.prompts}]"  # the hand-written pool's rows keep plain names
    for task in args.tasks.split(","):
        for target in args.targets.split(","):
            suffix = "" if args.prompts.isdigit() else "-" + args.prompts.replace(":", "")
            run_dir = args.out / "runs" / f"{task}-{target}{suffix}"
            config = CollectConfig(task=task, target=target, queries=args.queries, prompts=args.prompts,
                                   collect_queries=0, test_queries=0, seed=args.seed, batch_size=args.batch_size)
            start = time.perf_counter()
            summary = collect(config, run_dir)
            seconds = time.perf_counter() - start
            calls, made_by = summary.target_calls, {"commit": commit, "command": results["command"]}
            row = target + pool
            before = earlier.get("tasks", {}).get(task, {}).get(row)
            if before and calls < before["target_calls"]:
                # Pairs came from the score cache: keep the timing (and provenance) of the run that scored them.
                seconds, calls = before["collect_seconds"], before["target_calls"]
                made_by = {k: before.get(k, earlier.get(k)) for k in ("commit", "command")}
            stats = {**target_stats(run_dir, seconds, calls), "prompts": args.prompts, **made_by}
            results["tasks"].setdefault(task, {})[row] = stats
            print(f"{task} {target}: {summary.target_calls} pairs in {seconds:.0f} s", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out / "results.json", results)
    (args.out / "report.md").write_text(render(results), encoding="utf-8")
    plot(results, args.out / "accuracy.png")
    print(render(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
