"""The quality benchmark of one run: QPO after every loop against pool, selection and oracle baselines.

For one run directory (``qpo collect`` + ``qpo train``), every method is scored on the same
held-out queries, with the same target, template and per-query demonstrations, through the run's
score cache. ``none``, ``default`` and ``best_pool`` are the methods of ``qpo eval``
(:data:`qpo_middleware.training.evaluate.METHODS`), and QPO's greedy prompts are its ``qpo``
method run on each loop's policy; the benchmark adds:

* ``random_pool``  — a pool prompt drawn at random per query (seeded);
* ``selector``     — a Prompt-OIRL-style reward model fit on D0 picks a pool prompt per query
  (:mod:`qpo_middleware.training.selector`);
* ``oracle_pool``  — (optional) the best pool prompt per test query, found by scoring every pool
  prompt on every test query: the upper bound of selection, not a method;
* ``qpo_loop<t>``  — the greedy prompt of the policy after loop t, for every loop (:mod:`.policies`:
  an exported bundle through the torch-free runtime, or the checkpoint with torch);
* ``qpo_best_of_<n>`` — (optional) n prompts sampled from the final policy per query, the one
  the selector predicts most likely to be answered correctly is sent;
* ``qpo_implicit_best_of_<n>`` — the same samples, the one the policy itself rates highest is sent
  (:func:`~qpo_middleware.training.preference.implicit_rewards`: no selector, no extra model).

Per method: accuracy with a 95% percentile-bootstrap interval, per-label accuracy, mean prompt
length in words, policy latency p50 (per query, one query at a time), the target calls the method
spent in training (D0 and the loops) and in this evaluation. Per loop: the loop's metrics and the
reward distribution of the prompts it added, against D0's.
"""

from __future__ import annotations

import json
import logging
import os
import random
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from qpo_middleware.stats import paired_bootstrap_ci, summary
from qpo_middleware.training.dataset import steering_prompts
from qpo_middleware.training.evaluate import (
    METHODS,
    EvalInputs,
    MethodPrompts,
    MethodResult,
    best_train_prompt,
    hits_of,
    leakage,
    method_result,
    score_prompts,
)
from qpo_middleware.training.loops import LoopMetrics, chosen_loop, completed_loops
from qpo_middleware.training.preference import implicit_rewards
from qpo_middleware.training.run import Run, RunPaths
from qpo_middleware.training.selector import Selector
from qpo_middleware.training.targets import Score, Target
from qpo_middleware.training.tasks import LEAN_REACH, Example, resolve_prompts

from .config import BenchmarkConfig
from .policies import OnnxPolicy, TorchPolicy, open_policy

logger = logging.getLogger(__name__)

# What differs between two fresh runs with the same seed: wall times, latencies, paths, the machine.
VOLATILE_KEYS = frozenset({
    "environment", "timings", "seconds", "train_seconds", "policy_latency_ms_p50", "export_seconds",
    "wall_seconds", "checkpoint", "run_dir", "path", "out", "reused", "plots", "implicit_scoring_ms_p50",
})


@dataclass
class BenchMethod(MethodResult):
    """A :class:`MethodResult` with what the benchmark adds."""

    family: str = ""  # baseline | pool | selection | upper_bound | qpo
    loop: int | None = None
    training_target_calls: int = 0
    failed: int = 0
    accuracy_by_label: dict[str, float] = field(default_factory=dict)
    description: str = ""
    # The leakage check's fields (label_leak_share ... accuracy_without_steering) are MethodResult's, filled here
    # for every method, task-level ones included.

@dataclass
class TaskBenchmark:
    task: str
    target: str
    run_dir: str
    split: str
    queries: int
    labels: list[str]
    methods: list[BenchMethod]
    loops: list[dict[str, Any]]
    d0: dict[str, Any]
    gaps: list[dict[str, Any]]
    examples: list[dict[str, Any]]
    selector: dict[str, Any]
    bundles: dict[str, dict[str, Any]]
    per_query: dict[str, Any]
    timings: dict[str, float]
    config: dict[str, Any]
    kept_loop: int | None = None  # the loop whose policy is QPO's result: chosen on the dev split, else the last
    kept_loop_reason: str = ""

    def method(self, name: str) -> BenchMethod:
        return next(m for m in self.methods if m.method == name)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def label_routing(matrix: Sequence[Sequence[Score]], golds: Sequence[str], order: Sequence[int]) -> dict[str, int]:
    """Per gold label, the column of ``matrix`` (queries x prompts) right most often on that label's
    queries; ties go to the earlier column in ``order``."""
    routing = {}
    for gold in dict.fromkeys(golds):
        rows = [row for row, g in zip(matrix, golds, strict=True) if g == gold]
        routing[gold] = max(order, key=lambda j, rows=rows: (sum(r[j].correct for r in rows), -order.index(j)))
    return routing


def training_calls(run: Run, loops: Sequence[LoopMetrics]) -> tuple[int, dict[int, int]]:
    """Target calls spent on D0 (every D0 pair was scored once) and, cumulated, up to each loop."""
    summary_path = run.paths.collect_summary
    if summary_path.is_file():
        collected = json.loads(summary_path.read_text(encoding="utf-8"))
        d0_calls = int(collected.get("target_calls", 0)) + int(collected.get("cached_pairs", 0))
    else:  # a D0 imported from logs (qpo import-oirl): its pairs were scored elsewhere
        d0_calls = len(run.dataset().loop(0))
    cumulative, total = {}, d0_calls
    for metrics in loops:
        total += metrics.target_calls
        cumulative[metrics.loop] = total
    return d0_calls, cumulative


def benchmark(run_dir: str | os.PathLike[str], config: BenchmarkConfig | None = None, *,
              target: Target | None = None, progress: Callable[[str], None] | None = None) -> TaskBenchmark:
    """Score every method on the run's held-out split; see the module docstring."""
    config = config or BenchmarkConfig()
    started_all = time.perf_counter()
    run = Run.open(run_dir)
    directory = run.directory
    examples: list[Example] = run.splits.get(config.split)
    examples = examples[: config.limit] if config.limit else examples
    if not examples:
        raise ValueError(f"The {config.split} split of {directory} is empty; collect with --test-queries > 0.")
    dataset = run.dataset()
    d0 = dataset.loop(0)
    if not d0:
        raise ValueError(f"{directory} has no D0 records; run `qpo collect` first.")
    done = completed_loops(directory)
    loops = [m for m in done if config.loops is None or m.loop in config.loops]
    target = target or run.make_target()
    task = run.task
    labels = list(task.labels)
    d0_calls, calls_upto = training_calls(run, done)
    inputs = EvalInputs(run, examples, provider=config.provider)
    timings: dict[str, float] = {}

    def say(message: str) -> None:
        logger.info("%s: %s", task.name, message)
        if progress:
            progress(message)

    methods: list[BenchMethod] = []
    per_query_hits: dict[str, list[bool | None]] = {}
    per_query_prompts: dict[str, list[str]] = {}

    def add(name: str, written: MethodPrompts, *, family: str, scores: Sequence[Score] | None = None,
            training: int = 0, loop: int | None = None, eval_calls: int | None = None) -> BenchMethod:
        """Score ``written`` (unless ``scores`` are given) and record the method."""
        if scores is None:
            scores = score_prompts(run, target, examples, written.prompts, name)
        hits = hits_of(scores)
        by_label: dict[str, list[bool]] = defaultdict(list)
        for example, hit in zip(examples, hits, strict=True):
            if hit is not None:
                by_label[task.gold_text(example)].append(hit)
        shared = method_result(name, written, scores, seed=config.seed, bootstrap_samples=config.bootstrap_samples)
        if eval_calls is not None:
            shared.target_calls = eval_calls
        result = BenchMethod(
            **shared.to_dict(), family=family, loop=loop, training_target_calls=training, failed=len(hits) - shared.n,
            accuracy_by_label={k: statistics.fmean(v) for k, v in sorted(by_label.items())},
            description=written.description,
        )
        methods.append(result)
        per_query_hits[name] = hits
        per_query_prompts[name] = list(written.prompts)
        say(f"{name}: {result.accuracy:.1%} [{result.ci_low:.1%}, {result.ci_high:.1%}] on {result.n} queries")
        return result

    def add_shared(name: str, *, training: int = 0) -> None:
        """A method of ``qpo eval``, as it defines it."""
        add(name, METHODS[name].write(inputs), family=METHODS[name].family, training=training)

    pool = [text for _, text in resolve_prompts(task, run.config.prompts, run.config.include_empty)]
    d0_prompts = {r.prompt for r in d0}
    pool = [p for p in pool if p in d0_prompts] + sorted(d0_prompts - set(pool))  # the prompts D0 holds
    _, best_text, best_train_accuracy = best_train_prompt(run)

    # -- oracle first: its P x N pairs make every later pool method a cache hit ---------------
    oracle_matrix: list[list[Score]] | None = None
    if config.oracle:
        phase = time.perf_counter()
        say(f"oracle_pool: scoring {len(pool)} pool prompts x {len(examples)} queries")
        flat = score_prompts(run, target, [e for e in examples for _ in pool], pool * len(examples), "oracle")
        oracle_matrix = [flat[i * len(pool) : (i + 1) * len(pool)] for i in range(len(examples))]
        oracle_calls = sum(not s.cached for s in flat)
        timings["oracle_scoring"] = time.perf_counter() - phase

    phase = time.perf_counter()
    add_shared("none")
    add_shared("default")
    rng = random.Random(config.seed)
    add("random_pool", MethodPrompts([rng.choice(pool) for _ in examples],
                                     f"a random pool prompt per query (seed {config.seed}, {len(pool)} prompts)"),
        family="pool")
    add_shared("best_pool", training=d0_calls)
    timings["baselines"] = time.perf_counter() - phase

    phase = time.perf_counter()
    say(f"selector: fitting on D0 ({len(d0)} records)")
    selector = Selector.fit(d0, config.selector)
    timings["selector_fit"] = time.perf_counter() - phase
    chosen, select_ms = [], []
    for example in examples:
        tick = time.perf_counter()
        chosen.append(selector.select(example.query))
        select_ms.append((time.perf_counter() - tick) * 1000.0)
    add("selector", MethodPrompts(chosen, "a reward model fit on D0 picks the pool prompt per query (Prompt-OIRL style)",
                                  latencies=select_ms), family="selection", training=d0_calls)
    selector_info = {
        "records": len(d0), "prompts": len(selector.prompts), "l2_prompt": selector.config.l2_prompt,
        "final_train_loss": selector.final_loss, "config": selector.config.to_dict(),
        "distinct_prompts_selected": len(set(chosen)),
        "selection_counts": dict(sorted(
            ((p, chosen.count(p)) for p in set(chosen)), key=lambda kv: (-kv[1], kv[0]))),
    }

    if oracle_matrix is not None:
        order = sorted(range(len(pool)), key=lambda j: (pool[j] != best_text, j))  # best_pool first on ties
        prompts, scores = [], []
        for row in oracle_matrix:
            valid = [j for j in order if not row[j].failed]
            pick = next((j for j in valid if row[j].correct), valid[0] if valid else order[0])
            prompts.append(pool[pick])
            scores.append(row[pick] if valid else Score(failed=True))
        add("oracle_pool", MethodPrompts(
            prompts, f"the best of {len(pool)} pool prompts per test query (uses test labels: an upper bound)"),
            family="upper_bound", scores=scores, eval_calls=oracle_calls)
        if labels:  # how much of the pool oracle is routing by label: one prompt per gold label
            golds = [task.gold_text(e) for e in examples]
            routing = label_routing(oracle_matrix, golds, order)
            add("oracle_label_routing", MethodPrompts(
                [pool[routing[g]] for g in golds],
                "each gold label sent to the pool prompt with the best test accuracy on it (uses test labels: "
                "the part of the pool oracle that routing by label reaches)"),
                family="upper_bound", scores=[row[routing[g]] for row, g in zip(oracle_matrix, golds, strict=True)],
                eval_calls=0)

    # -- QPO after every loop: the greedy prompts of `qpo eval`'s qpo method, per loop's policy -----
    bundles: dict[str, dict[str, Any]] = {}
    final_policy: OnnxPolicy | TorchPolicy | None = None  # the kept loop's (chosen on dev when there is one)
    kept_metrics, kept_by = chosen_loop(loops) if loops else (None, "")
    queries = inputs.queries
    for metrics in loops:
        phase = time.perf_counter()
        policy, bundle = open_policy(directory, metrics.loop, config, say)
        if bundle is not None:
            bundles[f"loop_{metrics.loop}"] = bundle
        say(f"qpo loop {metrics.loop}: rewriting {len(examples)} queries (greedy, {policy.label})")
        prompts, latencies = policy.greedy(queries)
        add(f"qpo_loop{metrics.loop}",
            MethodPrompts(prompts, f"QPO policy after loop {metrics.loop}, greedy, {policy.label}", latencies=latencies),
            family=METHODS["qpo"].family, training=calls_upto[metrics.loop], loop=metrics.loop)
        timings[f"qpo_loop{metrics.loop}"] = time.perf_counter() - phase
        if kept_metrics is not None and metrics.loop == kept_metrics.loop:
            final_policy = policy

    if config.best_of_n and final_policy is not None and kept_metrics is not None:
        phase = time.perf_counter()
        n, last = config.best_of_n, kept_metrics.loop
        say(f"qpo best-of-{n}: sampling {n} prompts per query from loop {last}, selector picks")
        samples, latencies = final_policy.sample(queries, n)
        picks, candidates_kept = [], []
        for index, (query, sampled) in enumerate(zip(queries, samples, strict=True)):
            tick = time.perf_counter()
            candidates = list(dict.fromkeys(sampled))
            prompt, _ = selector.best_of(query, candidates)
            if latencies is not None:
                latencies[index] += (time.perf_counter() - tick) * 1000.0
            picks.append(prompt)
            candidates_kept.append(candidates)
        add(f"qpo_best_of_{n}", MethodPrompts(
            picks, f"{n} prompts sampled from the loop-{last} policy (top-k {config.sample_top_k}, "
                   f"top-p {config.sample_top_p}, {final_policy.label}); the selector's highest "
                   "predicted P(correct) is sent", latencies=latencies),
            family=METHODS["qpo"].family, training=calls_upto[last], loop=last)
        selector_info["best_of_n_distinct_candidates_mean"] = statistics.fmean(map(len, candidates_kept))
        timings["qpo_best_of_n"] = time.perf_counter() - phase

        # The same samples, picked by the policy's own implicit reward (no selector, no extra model).
        phase = time.perf_counter()
        say(f"qpo implicit best-of-{n}: the loop-{last} policy's top-vs-bottom reward-token log ratio picks")
        scorer = final_policy if isinstance(final_policy, TorchPolicy) else TorchPolicy(
            RunPaths(directory).checkpoint(last), config)
        implicit_picks, scoring_ms = [], []
        for query, candidates in zip(queries, candidates_kept, strict=True):
            tick = time.perf_counter()
            rewards = implicit_rewards(scorer.model, scorer.tokenizer, scorer.format, query, candidates)
            implicit_picks.append(candidates[max(range(len(candidates)), key=rewards.__getitem__)])
            scoring_ms.append((time.perf_counter() - tick) * 1000.0)
        add(f"qpo_implicit_best_of_{n}", MethodPrompts(
            implicit_picks, f"the same {n} samples per query; the one the loop-{last} policy rates highest "
                            "(log p(prompt | top reward token) - log p(prompt | bottom one), torch) is sent"),
            family=METHODS["qpo"].family, training=calls_upto[last], loop=last)
        selector_info["implicit_scoring_ms_p50"] = statistics.median(scoring_ms) if scoring_ms else None
        timings["qpo_implicit_best_of_n"] = time.perf_counter() - phase

    # -- leakage check: a prompt that names one label may win by answering, not by prompting ---------
    if labels and "best_pool" in per_query_hits:
        steering, leaning, known = steering_prompts(d0), steering_prompts(d0, LEAN_REACH), {r.prompt for r in d0}
        for method in methods:
            method.record_leakage(leakage(per_query_prompts[method.method], per_query_hits[method.method],
                                          per_query_hits["best_pool"], labels, steering, known, leaning=leaning))

    # -- loops: metrics and reward distributions of the prompts each loop added ------------------
    d0_rewards = [r.reward for r in d0]
    loop_rows = []
    for metrics in done:
        added = dataset.loop(metrics.loop)
        rewards = [r.reward for r in added]
        loop_rows.append({
            **metrics.to_dict(),
            "training_target_calls": calls_upto[metrics.loop],
            "new_records": len(added),
            "new_rewards": rewards,
            "new_reward_summary": summary(rewards),
            "new_accuracy": statistics.fmean(r.correct for r in added) if added else None,
            "new_distinct_prompts": len({r.prompt for r in added}),
            "test_accuracy": next((m.accuracy for m in methods if m.family == "qpo" and m.loop == metrics.loop
                                   and m.method.startswith("qpo_loop")), None),
        })
    d0_info = {"records": len(d0), "queries": len({r.query_id for r in d0}), "prompts": len(d0_prompts),
               "target_calls": d0_calls, "rewards": d0_rewards, "reward_summary": summary(d0_rewards),
               "accuracy": statistics.fmean(r.correct for r in d0),
               "best_prompt": best_text, "best_prompt_train_accuracy": best_train_accuracy}

    # -- gaps: final QPO vs best_pool and vs selector, paired over the same queries -------------
    gaps = []
    qpo_names = [m.method for m in methods if m.family == "qpo"]
    final_names = [n for n in qpo_names if kept_metrics is not None and n == f"qpo_loop{kept_metrics.loop}"]
    final_names += [n for n in qpo_names if n.startswith(("qpo_best_of_", "qpo_implicit_best_of_"))]
    for name in final_names:
        for other in ("best_pool", "selector", "oracle_pool", "none"):
            if other not in per_query_hits:
                continue
            a, b = per_query_hits[name], per_query_hits[other]
            diff, low, high, n_pairs = paired_bootstrap_ci(a, b, samples=config.bootstrap_samples, seed=config.seed)
            gaps.append({"method": name, "versus": other, "difference": diff, "ci_low": low, "ci_high": high,
                         "n": n_pairs,
                         "wins": sum(1 for x, y in zip(a, b, strict=True) if x is True and y is False),
                         "losses": sum(1 for x, y in zip(a, b, strict=True) if x is False and y is True)})

    # -- examples: generated prompts per gold label -------------------------------------------------
    shown = [m for m in ("best_pool", "selector", *(final_names[:1])) if m in per_query_prompts]
    examples_out = []
    by_label: dict[str, list[int]] = defaultdict(list)
    for i, example in enumerate(examples):
        by_label[task.gold_text(example)].append(i)
    for label in sorted(by_label):
        for i in by_label[label][: config.examples_per_label]:
            examples_out.append({
                "label": label, "query_id": examples[i].id, "query": examples[i].query,
                "prompts": {m: per_query_prompts[m][i] for m in shown},
                "correct": {m: per_query_hits[m][i] for m in shown},
            })

    per_query = {"query_ids": [e.id for e in examples], "labels": [task.gold_text(e) for e in examples],
                 "hits": {k: [None if h is None else int(h) for h in v] for k, v in per_query_hits.items()},
                 "prompts": {k: v for k, v in per_query_prompts.items()
                             if k not in ("none", "default", "best_pool")}}
    timings["total"] = time.perf_counter() - started_all
    return TaskBenchmark(
        task=task.name, target=target.id, run_dir=str(directory), split=config.split, queries=len(examples),
        labels=labels, methods=methods, loops=loop_rows, d0=d0_info, gaps=gaps, examples=examples_out,
        selector=selector_info, bundles=bundles, per_query=per_query, timings=timings, config=config.to_dict(),
        kept_loop=None if kept_metrics is None else kept_metrics.loop, kept_loop_reason=kept_by,
    )


def stable_view(payload: Any) -> Any:
    """``payload`` without timings, latencies, paths, cache-dependent call counts and the environment:
    what must be identical when the same benchmark is run again with the same seed."""
    if isinstance(payload, Mapping):
        return {k: stable_view(v) for k, v in payload.items() if k not in VOLATILE_KEYS}
    if isinstance(payload, list | tuple):
        return [stable_view(v) for v in payload]
    if isinstance(payload, float):
        return round(payload, 9)
    return payload
