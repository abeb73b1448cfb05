"""Held-out evaluation: QPO prompts against task-level baselines on the same target and queries.

The evaluation methods (:data:`METHODS`; ``qpo eval`` offers them all), scored on a run's held-out
split, each query with the same demonstrations:

* ``none``         — the query alone, no instruction;
* ``default``      — the task's default instruction;
* ``best_pool``    — the pool prompt with the best accuracy on the train split (D0), for every
  query: what a task-level optimizer (APE, OPRO, DSPy-style) delivers;
* ``qpo``          — the prompt the exported bundle writes for each query, through the
  torch-free runtime exactly as production would call it.

Beside each method that writes prompts per query, :func:`check_leakage` reports whether its prompts answer
rather than prompt (:class:`Leakage`).

A :class:`Method` only writes prompts (:class:`MethodPrompts`); :func:`score_prompts` and
:func:`method_result` score them and summarize the verdicts. The quality benchmark
(``benchmarks/qpo_bench``) scores these same definitions and adds its own methods on top.
"""

from __future__ import annotations

import logging
import os
import statistics
from collections import defaultdict
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from qpo_middleware.stats import bootstrap_ci

from .collect import score_pairs
from .dataset import steering_prompts
from .run import Run
from .targets import Pair, Score, Target
from .tasks import LEAN_REACH, Example, names_one_label

logger = logging.getLogger(__name__)


@dataclass
class MethodResult:
    method: str
    accuracy: float
    ci_low: float
    ci_high: float
    n: int
    mean_prompt_words: float
    prompt: str | None = None  # the one prompt of a task-level method; None when written per query
    policy_latency_ms_p50: float | None = None
    target_calls: int = 0
    # The leakage check of a method that writes prompts per query (None for a task-level one): see
    # :class:`Leakage`.
    label_leak_share: float | None = None
    accuracy_without_leaks: float | None = None
    steered_share: float | None = None
    steering_checked_share: float | None = None
    accuracy_without_steering: float | None = None
    leaning_share: float | None = None
    accuracy_without_leaning: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def record_leakage(self, check: Leakage) -> None:
        """Fill the leakage-check fields from ``check``."""
        for key, value in asdict(check).items():
            setattr(self, key, value)


@dataclass(frozen=True)
class Leakage:
    """Whether a per-query method wins by prompting or by answering.

    * ``label_leak_share``: the share of queries whose prompt names exactly one label word ("the answer is
      positive"), and ``accuracy_without_leaks``, the accuracy with those queries given the best pool prompt's
      verdict instead;
    * ``steered_share``: the share of queries sent a prompt that makes the target answer one label on D0 whatever
      the query (:func:`~.dataset.steering_prompts`; it may name no label at all), of the
      ``steering_checked_share`` of queries whose prompt D0 scored (only those can be judged), and
      ``accuracy_without_steering``, the accuracy with the steering ones given the best pool prompt's verdict;
    * ``leaning_share`` and ``accuracy_without_leaning``: the same for the softer line, prompts that *lean* the
      target to one label on D0 (:data:`~.tasks.LEAN_REACH`; every steering prompt leans).

    A gain that vanishes in the ``without`` accuracies came from the prompts leaning the target to a label, not
    from prompt optimization.
    """

    label_leak_share: float
    accuracy_without_leaks: float | None
    steered_share: float
    steering_checked_share: float
    accuracy_without_steering: float | None
    leaning_share: float
    accuracy_without_leaning: float | None


def flagged(prompts: Sequence[str], labels: Sequence[str], leaning: Mapping[str, str]) -> list[int]:
    """The indices of the prompts the leakage check may replace: those naming exactly one of ``labels``, or leaning
    the target to one label on D0 (a key of ``leaning``; every steering prompt leans)."""
    return [i for i, p in enumerate(prompts) if p in leaning or names_one_label(p, labels)]


def leakage(prompts: Sequence[str], hits: Sequence[bool | None], fallback: Sequence[bool | None],
            labels: Sequence[str], steering: Mapping[str, str], scored: Collection[str], *,
            leaning: Mapping[str, str]) -> Leakage:
    """The leakage check of one method (:class:`Leakage`): ``hits`` are its verdicts per query, ``fallback`` the
    best pool prompt's on the same queries (read only where a prompt is :func:`flagged`), ``steering`` and
    ``leaning`` are :func:`~.dataset.steering_prompts` of D0 (at the steering and the lean reach) and ``scored``
    the prompts D0 holds."""
    if not len(prompts) == len(hits) == len(fallback):
        raise ValueError(f"leakage got {len(prompts)} prompts, {len(hits)} verdicts and {len(fallback)} fallbacks.")
    leaks = [names_one_label(p, labels) for p in prompts]
    steers, leans = [p in steering for p in prompts], [p in leaning for p in prompts]

    def replaced(flags: Sequence[bool]) -> float | None:
        kept = [b if flag else h for h, b, flag in zip(hits, fallback, flags, strict=True)]
        valid = [k for k in kept if k is not None]
        return statistics.fmean(valid) if valid else None

    def share(flags: Sequence[bool]) -> float:
        return statistics.fmean(flags) if flags else 0.0

    return Leakage(label_leak_share=share(leaks), accuracy_without_leaks=replaced(leaks),
                   steered_share=share(steers), steering_checked_share=share([p in scored for p in prompts]),
                   accuracy_without_steering=replaced(steers), leaning_share=share(leans),
                   accuracy_without_leaning=replaced(leans))


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


# ---------------------------------------------------------------------------- the methods


@dataclass(frozen=True)
class EvalInputs:
    """What a method may read: the run, the queries it writes prompts for, and the bundle ``qpo`` runs."""

    run: Run
    examples: Sequence[Example]
    bundle: str | os.PathLike[str] | None = None
    provider: str | None = None  # the runtime's execution provider for ``qpo`` (None: the runtime's default)

    @property
    def queries(self) -> list[str]:
        return [example.query for example in self.examples]


@dataclass(frozen=True)
class MethodPrompts:
    """What a method sends: one prompt per query."""

    prompts: list[str]
    description: str
    fixed: str | None = None  # the one prompt of a task-level method
    latencies: list[float] | None = None  # the policy's milliseconds per query, when a policy wrote them


@dataclass(frozen=True)
class Method:
    """An evaluation method: a name, a family for reports, and how it writes a prompt per query."""

    name: str
    family: str  # baseline | pool | qpo (the benchmark adds selection and upper_bound)
    write: Callable[[EvalInputs], MethodPrompts]


def best_train_prompt(run: Run) -> tuple[str, str, float]:
    """(source, text, train accuracy) of the pool prompt with the best D0 accuracy."""
    hits: dict[tuple[str, str], list[bool]] = defaultdict(list)
    for record in run.dataset().loop(0):
        hits[(record.prompt_source, record.prompt)].append(record.correct)
    if not hits:
        raise ValueError(f"{run.directory} has no D0 records; run `qpo collect` first.")
    (source, text), values = max(hits.items(), key=lambda item: (statistics.fmean(item[1]), -len(item[0][1])))
    return source, text, statistics.fmean(values)


def qpo_prompts(optimizer: Any, queries: Sequence[str]) -> MethodPrompts:
    """The greedy prompts a loaded :class:`~qpo_middleware.PromptOptimizer` writes, one query at a time:
    the latency a single request sees in production."""
    outputs = [optimizer.optimize(query) for query in queries]
    return MethodPrompts([o.prompt for o in outputs], f"QPO policy, greedy, {optimizer.manifest.model.dtype} runtime",
                         latencies=[o.latency_ms for o in outputs])


def _none(inputs: EvalInputs) -> MethodPrompts:
    return MethodPrompts([""] * len(inputs.examples), "no instruction: the query alone", fixed="")


def _default(inputs: EvalInputs) -> MethodPrompts:
    text = inputs.run.task.default_prompt
    return MethodPrompts([text] * len(inputs.examples), "the task's default instruction", fixed=text)


def _best_pool(inputs: EvalInputs) -> MethodPrompts:
    _, text, train_accuracy = best_train_prompt(inputs.run)
    return MethodPrompts([text] * len(inputs.examples),
                         f"the pool prompt with the best D0 accuracy ({train_accuracy:.1%})", fixed=text)


def _qpo(inputs: EvalInputs) -> MethodPrompts:
    if inputs.bundle is None:
        raise ValueError("Method 'qpo' needs a bundle: pass --bundle DIR (made by `qpo export`).")
    from qpo_middleware import PromptOptimizer

    return qpo_prompts(PromptOptimizer.from_bundle(inputs.bundle, provider=inputs.provider), inputs.queries)


METHODS: dict[str, Method] = {method.name: method for method in (
    Method("none", "baseline", _none),
    Method("default", "baseline", _default),
    Method("best_pool", "pool", _best_pool),
    Method("qpo", "qpo", _qpo),
)}


# ---------------------------------------------------------------------------- scoring


def score_prompts(run: Run, target: Target, examples: Sequence[Example], prompts: Sequence[str],
                  source: str) -> list[Score]:
    """The target's verdict on each (example, prompt), with the example's demonstrations, through the run's cache."""
    pairs = [Pair(e, p, source, run.demos(e)) for e, p in zip(examples, prompts, strict=True)]
    return score_pairs(target, run.task, pairs, run.config.chunk_size)


def hits_of(scores: Sequence[Score]) -> list[bool | None]:
    """Per query: answered correctly, or ``None`` where the target failed (neither right nor wrong)."""
    return [None if s.failed else bool(s.correct) for s in scores]


def method_result(name: str, written: MethodPrompts, scores: Sequence[Score], *, seed: int = 0,
                  bootstrap_samples: int = 2000) -> MethodResult:
    """Accuracy over the scored queries with its bootstrap interval, prompt length, policy latency and
    the target calls the scoring spent (those not served by the cache)."""
    hits = [hit for hit in hits_of(scores) if hit is not None]
    low, high = bootstrap_ci(hits, samples=bootstrap_samples, seed=seed)
    return MethodResult(
        method=name, accuracy=sum(hits) / max(1, len(hits)), ci_low=low, ci_high=high, n=len(hits),
        mean_prompt_words=statistics.fmean(len(p.split()) for p in written.prompts), prompt=written.fixed,
        policy_latency_ms_p50=statistics.median(written.latencies) if written.latencies else None,
        target_calls=sum(not s.cached for s in scores),
    )


def check_leakage(run: Run, target: Target, examples: Sequence[Example], prompts: Sequence[str],
                  hits: Sequence[bool | None]) -> Leakage:
    """:func:`leakage` of per-query ``prompts`` on ``examples`` of ``run``: the best pool prompt is scored (through
    the run's cache) only on the queries whose prompt is flagged."""
    d0 = run.dataset().loop(0)
    steering, leaning = steering_prompts(d0), steering_prompts(d0, LEAN_REACH)
    replaced = flagged(prompts, run.task.labels, leaning)
    fallback: list[bool | None] = [None] * len(prompts)
    if replaced:
        _, best, _ = best_train_prompt(run)
        verdicts = hits_of(score_prompts(run, target, [examples[i] for i in replaced], [best] * len(replaced),
                                         "best_pool"))
        for i, verdict in zip(replaced, verdicts, strict=True):
            fallback[i] = verdict
    return leakage(prompts, hits, fallback, run.task.labels, steering, {r.prompt for r in d0}, leaning=leaning)


def evaluate(
    run_dir: str | os.PathLike[str],
    bundle: str | os.PathLike[str] | None = None,
    *,
    split: str = "test",
    methods: Sequence[str] = tuple(METHODS),
    target: Target | None = None,
    limit: int | None = None,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> EvalResult:
    """Score each method's prompts on the held-out split of a run; QPO prompts come from ``bundle``."""
    unknown = [name for name in methods if name not in METHODS]
    if unknown:
        raise ValueError(f"Unknown method {unknown[0]!r}; use {', '.join(METHODS)}.")
    run = Run.open(run_dir)
    examples = run.splits.get(split)[:limit] if limit else run.splits.get(split)
    if not examples:
        raise ValueError(f"The {split} split of {run_dir} is empty; collect with --test-queries > 0.")
    target = target or run.make_target()
    inputs = EvalInputs(run, examples, bundle)
    results: list[MethodResult] = []
    samples: list[dict[str, str]] = []
    for name in methods:
        if progress:
            progress(name)
        written = METHODS[name].write(inputs)
        scores = score_prompts(run, target, examples, written.prompts, name)
        result = method_result(name, written, scores, seed=seed)
        if written.fixed is None and run.task.labels:
            result.record_leakage(check_leakage(run, target, examples, written.prompts, hits_of(scores)))
        results.append(result)
        if METHODS[name].family == "qpo":
            samples = [{"query": e.query, "prompt": p} for e, p in zip(examples[:8], written.prompts, strict=False)]
    return EvalResult(task=run.task.name, target=target.id, split=split, queries=len(examples), methods=results,
                      examples=samples)
