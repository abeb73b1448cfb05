"""The QPO quality benchmark (issue 5): collect -> loops -> benchmark, per task, then a report.

Usage::

    python benchmarks/quality.py --tasks sst2,ag_news --profile cpu --seed 0 --shots 0
    # -> benchmarks/results/quality-cpu/{results.json, report.md, <task>_*.png, runs/<task>-.../}

For each task: ``collect`` (D0 on the train queries, sizes from the profile), ``run_loops``
(QPO loops 1..T), then :func:`qpo_bench.benchmark` (``benchmarks/qpo_bench``) on the held-out
test queries: none, default, random_pool, best_pool, selector, oracle_pool, QPO greedy after
every loop and QPO best-of-n (n sampled prompts, the selector's pick). ``results.json`` (config,
seeds, hardware, package versions, every number) is rewritten after each task; ``report.md``
and the PNG plots at the end. Deterministic given the seed (timings aside). Re-running the same
command resumes: scored pairs come from each run's cache, finished loops and matching bundles
are reused.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from qpo_middleware.training.config import RECIPES

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = "smollm2-135m-instruct"
console = Console(stderr=True)


@dataclass(frozen=True)
class Profile:
    """Sizes of one benchmark profile: collect sizes, training and loop settings, benchmark settings."""

    name: str
    queries: int  # train queries (D0)
    prompts: str  # pool prompts ("all" or a count); the empty prompt comes on top
    prompts_per_query: int  # pool prompts scored per train query (0 = all)
    collect_queries: int
    test_queries: int
    target_batch_size: int
    dev_queries: int = 0  # validation: never trained or sampled on; the kept loop is chosen there
    train: dict[str, Any] = field(default_factory=dict)  # TrainConfig fields
    loops: dict[str, Any] = field(default_factory=dict)  # LoopConfig fields (base_model and seed are set)
    bench: dict[str, Any] = field(default_factory=dict)  # BenchmarkConfig fields (seed is set)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def cpu_profile() -> Profile:
    """2 CPU cores, SmolLM2-135M as policy and target: sst2 + ag_news in about 40 minutes (36.1 min measured).

    D0 covers 160 train queries with 5 of the 14 prompts each (13 of the pool + empty, drawn per
    query): a query-dependent policy needs many queries more than every prompt on each (48 x 14
    before: the policy wrote about the same prompts for every query). The policy trains on D0's
    better half (``d0_floor_quantile=0.5``, the paper's "expert" D0) for 4 epochs.

    Estimate per task, from measured costs (a target pair ~0.15 s on sst2, ~0.2 s on ag_news whose
    queries are 1.7x longer; a top:4 training step on 8 examples ~1.1 s; int8 export ~1.5 min per
    bundle; int8 greedy rewrite ~0.3 s per query; about 1 min per loop for loading the policy,
    saving the checkpoint and generating):

    =========================================================================  ======  =======
    phase                                                                        sst2  ag_news
    =========================================================================  ======  =======
    collect: 160 queries x 5 of 14 prompts = 800 pairs                          2.0 m    2.7 m
    loop 1: 400 examples (D0's better half) x 4 epochs = 200 steps + greedy     4.6 m    5.8 m
    loops 2-3: 64 sampled + 32 greedy pairs, 1 epoch on ~430 examples (each)    2.5 m    2.8 m
    export: 3 int8 bundles                                                      4.5 m    4.5 m
    scoring: oracle 14 x 100 (covers none, random_pool, best_pool, selector),
      default 100, QPO 3 x 100, best-of-4 100 = ~1,900 pairs                    5.0 m    6.5 m
    policy decoding: 3 x 100 greedy + 100 x best-of-4 (4 rows); selector fit    2.3 m    2.5 m
    dev split: 100 greedy rewrites + 100 pairs per loop (chooses the kept loop)  ~3 m     ~3 m
    total                                                                      ~23 m    ~27 m
    =========================================================================  ======  =======

    Together ~50 min estimated, 36.1 min measured (sst2 alone 15.5 min on seed 1). To make room:
    ``--no-oracle`` saves 3-5 min per task (the pool baselines are then scored alone), ``--best-of-n 0``
    ~1.2 min, ``--quantize none`` (fp32 export, ~45 s per bundle, slower rewrites) ~1 min.
    """
    return Profile(
        name="cpu", queries=160, prompts="13", prompts_per_query=5, collect_queries=32, test_queries=100,
        dev_queries=100, target_batch_size=16,
        train={"epochs": 4, "learning_rate": 2e-4, "batch_size": 8, "trainable": "top:4", "prompt_max_tokens": 32,
               "query_max_tokens": 40, **RECIPES["paper"].train},
        loops={"loops": 3, "samples_per_query": 2, "later_epochs": 1, **RECIPES["paper"].loops},
        bench={"oracle": True, "best_of_n": 4, "quantize": "int8"},
    )


def gpu_profile() -> Profile:
    """One GPU, the full sizes: 500 train queries x all 28 prompts (14,000 D0 pairs), 200 collect,
    500 test, 4 loops, every weight trained. The policy is evaluated with the torch backend (each
    loop's checkpoint, batched on the GPU): the device machines' ONNX Runtime has no CUDA provider,
    and 500 queries x 4 loops one at a time on its CPU would dominate the run. ``--policy-backend onnx``
    evaluates fp32 bundles through the runtime instead. Measured on an NVIDIA H200 (16 cores): 7.4 min
    per task, sst2 and ag_news as two processes side by side (benchmarks/device/, results in
    benchmarks/results/quality-gpu); loops ~4 min, selector fit ~1.7 min (numpy, CPU), oracle 30-37 s."""
    return Profile(
        name="gpu", queries=500, prompts="all", prompts_per_query=0, collect_queries=200, test_queries=500,
        dev_queries=200, target_batch_size=64,
        train={"epochs": 3, "learning_rate": 1e-4, "batch_size": 32, "trainable": "all", "prompt_max_tokens": 40,
               "query_max_tokens": 40, **RECIPES["paper"].train},
        loops={"loops": 4, "samples_per_query": 4, "later_epochs": 1, "generation_batch_size": 64,
               **RECIPES["paper"].loops},
        bench={"oracle": True, "best_of_n": 8, "quantize": None, "policy_backend": "torch", "policy_batch_size": 256},
    )


def cpu_v1_profile() -> Profile:
    """The CPU profile before D0 got more queries: 48 train queries x all 14 prompts, loop 1 on all of D0
    for 2 epochs; the rest as :func:`cpu_profile`. Kept to compare the two on other seeds."""
    profile = cpu_profile()
    return Profile(**{**profile.to_dict(), "name": "cpu-v1", "queries": 48, "prompts_per_query": 0, "dev_queries": 0,
                      "train": {**profile.train, "epochs": 2}, "loops": {**profile.loops, "d0_floor_quantile": 0.0}})


PROFILES: dict[str, Callable[[], Profile]] = {"cpu": cpu_profile, "cpu-v1": cpu_v1_profile, "gpu": gpu_profile}


def with_overrides(profile: Profile, settings: Sequence[str]) -> Profile:
    """``profile`` with ``SECTION.FIELD=VALUE`` settings applied (sections: train, loops, bench, and size for
    the profile's own sizes: queries, prompts, prompts_per_query, collect_queries, test_queries, dev_queries,
    target_batch_size)."""
    import json

    sections = {"train": dict(profile.train), "loops": dict(profile.loops), "bench": dict(profile.bench)}
    sizes: dict[str, Any] = {}
    size_fields = {"queries", "prompts", "prompts_per_query", "collect_queries", "test_queries", "dev_queries",
                   "target_batch_size"}
    for setting in settings:
        key, sep, raw = setting.partition("=")
        section, dot, name = key.partition(".")
        if not sep or not dot or section not in (*sections, "size") or not name:
            raise SystemExit(f"--set {setting!r}: expected SECTION.FIELD=VALUE with SECTION one of train, loops, "
                             "bench, size.")
        if section == "size" and name not in size_fields:
            raise SystemExit(f"--set {setting!r}: size fields are {', '.join(sorted(size_fields))}.")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        (sizes if section == "size" else sections[section])[name] = value
    return Profile(**{**profile.to_dict(), **sizes, **sections})


def reuse_d0(source: Path, run_dir: Path) -> bool:
    """Start ``run_dir`` from the D0 of ``source`` (another recipe's run of the same task and seed): its
    run.json, collect summary, score cache and loop-0 records, so recipes compare on the same D0 and pay
    no target call twice. Nothing happens when ``run_dir`` exists already."""
    from qpo_middleware.training.dataset import OfflineDataset
    from qpo_middleware.training.run import RunPaths

    if run_dir.exists() or not RunPaths(source).is_run():
        return False
    src, dst = RunPaths(source), RunPaths(run_dir)
    staging = run_dir.with_name(run_dir.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for path in (src.run_file, src.collect_summary, src.scores):
        if path.is_file():
            shutil.copy2(path, staging / path.name)
    OfflineDataset(staging).append(OfflineDataset(source).loop(0))
    staging.rename(dst.root)
    return True


def default_data_dir() -> Path | None:
    value = os.environ.get("QPO_DATA")
    if value:
        return Path(value)
    candidate = REPO.parent / "shared" / "data"
    return candidate if candidate.is_dir() else None


def run_quality(tasks: Sequence[str], profile: Profile, out: Path, *, seed: int = 0, shots: int = 0,
                model: str = DEFAULT_MODEL, target: str | None = None, data_dir: Path | None = None,
                say: Callable[[str], None] = print, notes: Sequence[str] = (),
                d0_from: Path | None = None) -> dict[str, Any]:
    """collect -> loops -> benchmark for every task; writes results.json, report.md and plots under ``out``.

    ``model`` is the policy base; ``target`` the target LLM (default: the same model); ``d0_from`` an earlier
    output folder whose D0 and score cache each new run starts from (:func:`reuse_d0`)."""
    target_name = target or model
    from qpo_bench import BenchmarkConfig, benchmark, environment, write_plots, write_report
    from qpo_middleware.training.collect import collect
    from qpo_middleware.training.config import CollectConfig, LoopConfig, TrainConfig
    from qpo_middleware.training.io import atomic_write_json
    from qpo_middleware.training.loops import run_loops
    from qpo_middleware.training.run import Run

    if data_dir is not None:
        os.environ["QPO_DATA"] = str(data_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    train = TrainConfig(**{**profile.train, "seed": seed})
    loops = LoopConfig(**{**profile.loops, "base_model": model, "seed": seed})
    bench = BenchmarkConfig(**{**profile.bench, "seed": seed})
    payload: dict[str, Any] = {
        "config": {"profile": profile.name, "tasks": list(tasks), "seed": seed, "shots": shots, "model": model,
                   "target": target_name,
                   "sizes": profile.to_dict(), "train": asdict(train), "loops": asdict(loops),
                   "benchmark": bench.to_dict(), "seeds": {"splits": seed, "demonstrations": seed, "training": seed,
                                                           "policy_sampling": seed, "benchmark": seed}},
        "environment": environment(),
        "command": " ".join(["python", *sys.argv]),
        "commit": subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parents[1],
                                 capture_output=True, text=True).stdout.strip(),
        "notes": list(notes),
        "tasks": {},
    }
    for name in tasks:
        run_dir = out / "runs" / f"{name}-seed{seed}-shots{shots}"
        timings: dict[str, float] = {}
        collect_config = CollectConfig(task=name, target=target_name, queries=profile.queries,
                                       collect_queries=profile.collect_queries, test_queries=profile.test_queries,
                                       dev_queries=profile.dev_queries, prompts=profile.prompts, prompts_per_query=profile.prompts_per_query,
                                       shots=shots, seed=seed,
                                       batch_size=profile.target_batch_size)
        if d0_from is not None and reuse_d0(d0_from / "runs" / run_dir.name, run_dir):
            say(f"[{name}] D0 and score cache copied from {d0_from / 'runs' / run_dir.name}")
        run = Run.open(run_dir, collect_config)
        scorer = run.make_target()  # one target (one model load) for collect, loops and benchmark

        phase = time.perf_counter()
        say(f"[{name}] collect: {profile.queries} queries x {profile.prompts} pool prompts -> {run_dir}")
        summary = collect(collect_config, run_dir, target=scorer)
        timings["collect"] = time.perf_counter() - phase
        say(f"[{name}] D0: best prompt {summary.best_prompt.accuracy:.1%}, oracle {summary.oracle_accuracy:.1%}")

        phase = time.perf_counter()
        tag = f"[{name}]"
        run_loops(run_dir, train, loops, target=scorer,
                  on_phase=lambda loop, what, tag=tag: say(f"{tag} loop {loop}: {what}"))
        timings["loops"] = time.perf_counter() - phase

        result = benchmark(run_dir, bench, target=scorer, progress=lambda message, tag=tag: say(f"{tag} {message}"))
        task_payload = result.to_dict()
        task_payload["timings"] = {**timings, **{f"benchmark_{k}": v for k, v in result.timings.items()}}
        task_payload["plots"] = [str(p.relative_to(out)) for p in write_plots(task_payload, out, name=name)]
        payload["tasks"][name] = task_payload
        payload["wall_seconds"] = time.perf_counter() - started
        atomic_write_json(out / "results.json", payload)
    payload["wall_seconds"] = time.perf_counter() - started
    atomic_write_json(out / "results.json", payload)
    write_report(payload, out)
    return payload


def print_headline(payload: dict[str, Any]) -> None:
    for name, task in payload["tasks"].items():
        table = Table(title=f"{name}: {task['queries']} held-out queries on {task['target']}")
        for column in ("method", "accuracy", "95% CI", "prompt words", "policy p50", "training calls"):
            table.add_column(column, justify="left" if column == "method" else "right")
        for m in task["methods"]:
            latency = "-" if m["policy_latency_ms_p50"] is None else f"{m['policy_latency_ms_p50']:.0f} ms"
            table.add_row(m["method"], f"{m['accuracy']:.1%}", f"{m['ci_low']:.1%} - {m['ci_high']:.1%}",
                          f"{m['mean_prompt_words']:.1f}", latency, str(m["training_target_calls"]))
        console.print(table)
        for gap in task["gaps"]:
            console.print(f"  {gap['method']} vs {gap['versus']}: {gap['difference'] * 100:+.1f} points "
                          f"[{gap['ci_low'] * 100:+.1f}, {gap['ci_high'] * 100:+.1f}]")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default="sst2,ag_news", help="Comma-separated tasks (built-in names or task.json).")
    parser.add_argument("--profile", choices=sorted(PROFILES), default="cpu", help="Sizes: cpu (~40 min on 2 cores), cpu-v1 (the previous cpu profile) or gpu.")
    parser.add_argument("--out", type=Path, default=None, help="Output folder (default benchmarks/results/quality-<profile>).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of splits, demonstrations, training, sampling, bootstrap.")
    parser.add_argument("--shots", type=int, default=0, help="Few-shot demonstrations per query.")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="Policy base model and local target.")
    parser.add_argument("--data-dir", type=Path, default=default_data_dir(), help="Data collection root (default $QPO_DATA or ../shared/data).")
    parser.add_argument("--oracle", action=argparse.BooleanOptionalAction, default=None, help="Score the per-query pool oracle (profile default: on).")
    parser.add_argument("--best-of-n", type=int, default=None, help="QPO best-of-n samples per query (0 = off; profile default).")
    parser.add_argument("--note", action="append", default=[], help="A note for results.json and the report (repeatable): how settings were chosen, what else ran.")
    parser.add_argument("--quantize", choices=("int8", "none"), default=None, help="Bundle export (profile default).")
    parser.add_argument("--target", default=None, help="Target LLM (default: --model), e.g. qwen2.5-coder-0.5b-instruct.")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="Override a profile setting, e.g. train.conditioning=query_rank or loops.preference=after "
                             "(repeatable; VALUE is parsed as JSON when it can be, else taken as a string).")
    parser.add_argument("--policy-backend", choices=("onnx", "torch"), default=None,
                        help="Run the QPO policy as exported bundles through the runtime (onnx, with latency) or as "
                             "checkpoints with torch, batched on the GPU (profile default: onnx on cpu, torch on gpu).")
    parser.add_argument("--d0-from", type=Path, default=None,
                        help="An earlier output folder of the same tasks and seed: start each run from its D0 and score "
                             "cache (compare recipes on the same D0 without scoring it again).")
    args = parser.parse_args(argv)

    profile = PROFILES[args.profile]()
    bench = dict(profile.bench)
    if args.oracle is not None:
        bench["oracle"] = args.oracle
    if args.best_of_n is not None:
        bench["best_of_n"] = args.best_of_n
    if args.quantize is not None:
        bench["quantize"] = None if args.quantize == "none" else args.quantize
    if args.policy_backend is not None:
        bench["policy_backend"] = args.policy_backend
    profile = with_overrides(Profile(**{**profile.to_dict(), "bench": bench}), args.set)
    out = args.out or REPO / "benchmarks" / "results" / f"quality-{profile.name}"
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]

    logging.basicConfig(level=logging.INFO, format="%(message)s", handlers=[RichHandler(console=console, show_path=False)])
    for noisy in ("httpx", "urllib3", "transformers", "optimum", "onnxruntime"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    payload = run_quality(tasks, profile, out, seed=args.seed, shots=args.shots, model=args.model, target=args.target,
                          data_dir=args.data_dir, say=lambda message: console.log(message), notes=args.note,
                          d0_from=args.d0_from)
    print_headline(payload)
    console.print(f"results: {out / 'results.json'}   report: {out / 'report.md'}   "
                  f"wall time {payload['wall_seconds'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
