"""Build the initial offline dataset D0: score every (train query, pool prompt) on the target.

``collect`` fills a run directory (see :mod:`.run`): ``run.json`` (what was asked),
``scores.sqlite`` (every target verdict), ``dataset.jsonl`` (D0) and ``collect.json`` (its summary).
A killed collect resumes by re-running the same command: scored pairs come
back from ``scores.sqlite`` without target calls, and dataset records are
appended by key, so nothing is lost, torn or duplicated.
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from .config import CollectConfig, RewardConfig
from .dataset import Record, steering_prompts
from .io import atomic_write_json
from .run import Run
from .targets import Pair, Score, Target
from .tasks import Task

if TYPE_CHECKING:
    from .induce import Inducer

logger = logging.getLogger(__name__)


@dataclass
class PromptStats:
    prompt_id: str
    prompt: str
    accuracy: float
    n: int


@dataclass
class InductionStats:
    """How the induced (or mutated) part of the pool was made: candidates asked, kept, and why the rest were dropped."""

    inducer: str
    asked: int
    kept: int
    dropped: dict[str, int]  # reason -> count (see induce.DROP_REASONS)


@dataclass
class CollectSummary:
    task: str
    target: str
    queries: int
    prompts: list[PromptStats]
    best_prompt: PromptStats
    oracle_accuracy: float
    target_calls: int
    cached_pairs: int
    failed_pairs: int
    tokens_scored: int
    records_written: int
    dataset_records: int
    induction: InductionStats | None = None
    mutation: InductionStats | None = None  # --mutate: the variations of D0's best prompts

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# -- scoring and rewards -------------------------------------------------------------------------


def score_pairs(target: Target, task: Task, pairs: Sequence[Pair], chunk_size: int = 64,
                progress: Callable[[int], None] | None = None) -> list[Score]:
    """Score in chunks so that each chunk's verdicts reach the cache before the next starts."""
    scores: list[Score] = []
    for start in range(0, len(pairs), chunk_size):
        scores.extend(target.score(task, pairs[start : start + chunk_size], progress))
    return scores


def make_records(task: Task, target_id: str, pairs: Sequence[Pair], scores: Sequence[Score], loop: int,
                 rewards: RewardConfig, prompt_accuracy: dict[str, float] | None = None) -> list[Record]:
    """Dataset records for the scored pairs (failed ones skipped).

    ``prompt_accuracy`` maps prompt text to its mean accuracy; by default it is
    measured over the given pairs themselves.
    """
    if prompt_accuracy is None:
        prompt_accuracy = mean_accuracy_by_prompt(pairs, scores)
    records = []
    for pair, score in zip(pairs, scores, strict=True):
        if score.failed:
            continue
        accuracy = prompt_accuracy.get(pair.prompt, float(score.correct))
        records.append(Record(
            task=task.name, query_id=pair.example.id, query=pair.example.query, prompt=pair.prompt,
            prompt_source=pair.prompt_source, loop=loop, target=target_id, correct=bool(score.correct),
            reward=rewards.reward(score.correct, accuracy, rewards.nll_of(score.gold_nll, score.label_nll)),
            prompt_mean_accuracy=accuracy, gold_nll=score.gold_nll, label_nll=score.label_nll, prediction=score.prediction, label=task.gold_text(pair.example),
        ))
    return records


def mean_accuracy_by_prompt(pairs: Sequence[Pair], scores: Sequence[Score]) -> dict[str, float]:
    hits: dict[str, list[bool]] = defaultdict(list)
    for pair, score in zip(pairs, scores, strict=True):
        if not score.failed:
            hits[pair.prompt].append(bool(score.correct))
    return {prompt: sum(v) / len(v) for prompt, v in hits.items()}


# -- the collect job --------------------------------------------------------------------------


def collect(config: CollectConfig, out: str | os.PathLike[str], *, target: Target | None = None,
            progress: Callable[[int, int], None] | None = None, inducer: Inducer | None = None,
            induce_progress: Callable[[int], None] | None = None) -> CollectSummary:
    """Score the pool on the train queries, append D0 (loop 0) to the dataset, write the summary.

    With ``config.induce``, the induced candidates are made first (by ``inducer``, default the
    configured model; ``induce_progress(1)`` per candidate) and kept in ``prompts.json``, or read
    back from it on resume. With ``config.mutate``, once the pool is scored the same inducer writes
    variations of D0's best prompts (``mutations.json``, :meth:`.Run.grow`), and the kept ones are
    scored on D0's queries too; the total of ``progress(done, total)`` grows then. ``progress`` is
    called as pairs finish (the CLI draws a bar).
    """
    run = Run.open(out, config)
    prompts = run.base_prompts(inducer, induce_progress)
    induced = run.induced()  # read back from prompts.json
    pairs = run.d0_pairs(prompts)
    target = target or run.make_target()
    logger.info("Scoring %d pairs (%d queries x %d of %d prompts) on %s", len(pairs), len(run.splits.train),
                len(pairs) // max(1, len(run.splits.train)), len(prompts), target.id)

    done, total = 0, len(pairs)

    def advance(n: int) -> None:
        nonlocal done
        done += n
        if progress:
            progress(done, total)

    scores = score_pairs(target, run.task, pairs, config.chunk_size, advance)
    grown = None
    if config.mutate:  # variations of the best prompts on D0, scored on D0's queries like the rest of the pool
        steering = steering_prompts(make_records(run.task, target.id, pairs, scores, loop=0, rewards=config.rewards)) \
            if config.mutate_plain else {}
        grown = run.grow(prompts, mean_accuracy_by_prompt(pairs, scores), inducer, steering)
        extra = run.mutation_pairs(len(prompts), grown.prompts)
        total += len(extra)
        logger.info("Scoring %d pairs of %d kept variations (of %d written)", len(extra), len(grown.kept), grown.asked)
        scores += score_pairs(target, run.task, extra, config.chunk_size, advance)
        pairs, prompts = [*pairs, *extra], [*prompts, *grown.prompts]

    dataset = run.dataset()
    written = dataset.append(make_records(run.task, target.id, pairs, scores, loop=0, rewards=config.rewards))
    summary = summarize(run.task, target.id, pairs, scores, prompts, written, len(dataset))
    if induced is not None:
        summary.induction = InductionStats(induced.inducer, induced.asked, len(induced.kept), induced.drop_counts())
    if grown is not None:
        summary.mutation = InductionStats(grown.inducer, grown.asked, len(grown.kept), grown.drop_counts())
    atomic_write_json(run.paths.collect_summary, summary.to_dict())
    return summary


def summarize(task: Task, target_id: str, pairs: Sequence[Pair], scores: Sequence[Score],
              prompts: Sequence[tuple[str, str]], written: int, total: int) -> CollectSummary:
    accuracy = mean_accuracy_by_prompt(pairs, scores)
    counts: dict[str, int] = defaultdict(int)
    per_query: dict[str, bool] = defaultdict(bool)
    for pair, score in zip(pairs, scores, strict=True):
        if not score.failed:
            counts[pair.prompt] += 1
            per_query[pair.example.id] |= bool(score.correct)
    stats = sorted(
        (PromptStats(source, text, accuracy.get(text, 0.0), counts[text]) for source, text in prompts),
        key=lambda s: -s.accuracy,
    )
    return CollectSummary(
        task=task.name, target=target_id, queries=len({p.example.id for p in pairs}), prompts=stats,
        best_prompt=stats[0], oracle_accuracy=sum(per_query.values()) / max(1, len(per_query)),
        target_calls=sum(1 for s in scores if not s.cached), cached_pairs=sum(1 for s in scores if s.cached),
        failed_pairs=sum(1 for s in scores if s.failed),
        tokens_scored=sum(s.tokens for s in scores if not s.cached),
        records_written=written, dataset_records=total,
    )
