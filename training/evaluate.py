"""Held-out evaluation: QPO prompts against task-level baselines on the same target and queries.

Methods (all on the run's test split, each query with the same demonstrations):

* ``none``         — the query alone, no instruction;
* ``default``      — the task's default instruction;
* ``best_pool``    — the pool prompt with the best accuracy on the train split (D0), for every
  query: what a task-level optimizer (APE, OPRO, DSPy-style) delivers;
* ``oracle_pool``  — (optional) the best pool prompt per test query: the upper bound of selection;
* ``qpo``          — the prompt the exported bundle writes for each query, through the
  torch-free runtime exactly as production would call it.
"""

from __future__ import annotations

import logging
import os
import random
import statistics
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from .collect import Run, score_pairs
from .targets import Pair, Target

logger = logging.getLogger(__name__)


@dataclass
class MethodResult:
    method: str
    accuracy: float
    ci_low: float
    ci_high: float
    n: int
    mean_prompt_words: float
    prompt: str | None = None  # the one prompt of a task-level method
    policy_latency_ms_p50: float | None = None
    target_calls: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class EvalResult:
    task: str
    target: str
    split: str
    queries: int
    methods: list[MethodResult]
    examples: list[dict[str, str]] = field(default_factory=list)

    def method(self, name: str) -> MethodResult:
        return next(m for m in self.methods if m.method == name)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def bootstrap_ci(hits: Sequence[bool], *, samples: int = 2000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``hits``; deterministic given ``seed``."""
    if not hits:
        return (0.0, 0.0)
    rng = random.Random(seed)
    n = len(hits)
    values = [int(h) for h in hits]
    means = sorted(sum(rng.choices(values, k=n)) / n for _ in range(samples))
    low = means[int((1 - level) / 2 * samples)]
    high = means[min(samples - 1, int((1 + level) / 2 * samples))]
    return (low, high)


def best_train_prompt(run: Run) -> tuple[str, str, float]:
    """(source, text, train accuracy) of the pool prompt with the best D0 accuracy."""
    hits: dict[tuple[str, str], list[bool]] = defaultdict(list)
    for record in run.dataset().loop(0):
        hits[(record.prompt_source, record.prompt)].append(record.correct)
    if not hits:
        raise ValueError(f"{run.directory} has no D0 records; run `qpo collect` first.")
    (source, text), values = max(hits.items(), key=lambda item: (statistics.fmean(item[1]), -len(item[0][1])))
    return source, text, statistics.fmean(values)


def evaluate(
    run_dir: str | os.PathLike[str],
    bundle: str | os.PathLike[str] | None = None,
    *,
    split: str = "test",
    methods: Sequence[str] = ("none", "default", "best_pool", "qpo"),
    target: Target | None = None,
    limit: int | None = None,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> EvalResult:
    """Score each method's prompts on the held-out split of a run; QPO prompts come from ``bundle``."""
    run = Run.open(run_dir)
    examples = run.splits.get(split)[:limit] if limit else run.splits.get(split)
    if not examples:
        raise ValueError(f"The {split} split of {run_dir} is empty; collect with --test-queries > 0.")
    target = target or run.make_target()
    results: list[MethodResult] = []
    samples: list[dict[str, str]] = []

    def score(name: str, prompts: Sequence[str], fixed: str | None = None,
              latencies: Sequence[float] | None = None) -> None:
        if progress:
            progress(name)
        pairs = [Pair(e, p, name, run.demos(e)) for e, p in zip(examples, prompts, strict=True)]
        scores = score_pairs(target, run.task, pairs, run.config.chunk_size)
        hits = [s.correct for s in scores if not s.failed]
        low, high = bootstrap_ci(hits, seed=seed)
        results.append(MethodResult(
            method=name, accuracy=sum(hits) / max(1, len(hits)), ci_low=low, ci_high=high, n=len(hits),
            mean_prompt_words=statistics.fmean(len(p.split()) for p in prompts), prompt=fixed,
            policy_latency_ms_p50=statistics.median(latencies) if latencies else None,
            target_calls=sum(not s.cached for s in scores),
        ))

    for method in methods:
        if method == "none":
            score("none", [""] * len(examples), "")
        elif method == "default":
            score("default", [run.task.default_prompt] * len(examples), run.task.default_prompt)
        elif method == "best_pool":
            _, text, _ = best_train_prompt(run)
            score("best_pool", [text] * len(examples), text)
        elif method == "qpo":
            if bundle is None:
                raise ValueError("Method 'qpo' needs a bundle: pass --bundle DIR (made by `qpo export`).")
            from qpo_middleware import PromptOptimizer

            optimizer = PromptOptimizer.from_bundle(bundle)
            # One query at a time: the latency a single request sees in production.
            outputs = [optimizer.optimize(example.query) for example in examples]
            score("qpo", [o.prompt for o in outputs], latencies=[o.latency_ms for o in outputs])
            samples = [{"query": e.query, "prompt": o.prompt} for e, o in list(zip(examples, outputs, strict=True))[:8]]
        else:
            raise ValueError(f"Unknown method {method!r}; use none, default, best_pool or qpo.")
    return EvalResult(task=run.task.name, target=target.id, split=split, queries=len(examples), methods=results,
                      examples=samples)
