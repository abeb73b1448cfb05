"""Build the initial offline dataset D0: score every (train query, pool prompt) on the target.

A run directory holds everything a QPO run makes::

    run.json         what was asked (task, splits, seed, target, shots, rewards)
    scores.sqlite    every target verdict, committed as it comes (resume = cache hits)
    dataset.jsonl    the offline dataset (append-only, checksummed records)
    collect.json     the D0 summary (accuracy per prompt, oracle, calls, tokens)

A killed collect resumes by re-running the same command: scored pairs come
back from ``scores.sqlite`` without target calls, and dataset records are
appended by key, so nothing is lost, torn or duplicated.
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from qpo_middleware.template import Demo

from .dataset import OfflineDataset, Record
from .io import atomic_write_json
from .targets import Pair, Score, ScoreCache, Target, make_target
from .tasks import Example, Splits, Task, get_task, load_prompt_pool

logger = logging.getLogger(__name__)

RUN_FILE = "run.json"
SCORES_FILE = "scores.sqlite"
SUMMARY_FILE = "collect.json"


NLL_KINDS = ("label_set", "vocab")


@dataclass
class RewardConfig:
    """Reward = correct_weight*correct + prompt_accuracy_weight*prompt_mean_accuracy - nll_weight*NLL.

    NLL is, with ``nll="label_set"`` (the default), the gold label's NLL renormalised over the
    task's label words; with ``nll="vocab"``, the gold label word's NLL over the whole vocabulary
    (the paper's literal reading). With a small target the vocabulary NLL mostly measures whether
    the prompt makes *any* bare label word likely (prompts that list the labels win whether or not
    the answer is right: on SmolLM2 it filled the top reward bucket with below-average prompts), so
    the label-set NLL is the default. Math tasks and chat targets have no label set: their NLL is
    the answer's own (or none).
    """

    correct_weight: float = field(default=10.0, metadata={"help": "Weight of the pair's correctness (0/1)."})
    prompt_accuracy_weight: float = field(default=10.0, metadata={"help": "Weight of the prompt's mean accuracy."})
    nll_weight: float = field(default=1.0, metadata={"help": "Weight of the gold answer's NLL (subtracted)."})
    nll: str = field(default="label_set", metadata={
        "help": "'label_set': gold NLL renormalised over the label words; 'vocab': over the whole vocabulary."})

    def __post_init__(self) -> None:
        if self.nll not in NLL_KINDS:
            raise ValueError(f"rewards.nll must be one of {', '.join(NLL_KINDS)}; got {self.nll!r}.")

    def nll_of(self, gold_nll: float | None, label_nll: float | None) -> float | None:
        """The NLL this config's reward uses (``label_nll`` is None where there is no label set)."""
        if self.nll == "label_set" and label_nll is not None:
            return label_nll
        return gold_nll

    def reward(self, correct: bool, prompt_mean_accuracy: float, nll: float | None) -> float:
        value = self.correct_weight * float(correct) + self.prompt_accuracy_weight * prompt_mean_accuracy
        if nll is not None:
            value -= self.nll_weight * min(nll, 50.0)  # cap: one absurd NLL must not dominate
        return value


@dataclass
class CollectConfig:
    """What ``qpo collect`` does; the CLI exposes every field with this help."""

    task: str = field(default="sst2", metadata={"help": "Built-in task name or a task spec file (task.json)."})
    target: str = field(default="smollm2-135m-instruct",
                        metadata={"help": "Target LLM: a model name/path, or a LangChain chat model as module:factory."})
    queries: int = field(default=50, metadata={"help": "Train queries to score (the D0 query set)."})
    collect_queries: int = field(default=100, metadata={"help": "Held-out queries the training loops sample prompts for."})
    test_queries: int = field(default=100, metadata={"help": "Held-out test queries for evaluation."})
    prompts: str = field(default="all", metadata={"help": "'all', a number N (N prompts spread over the pool), or a JSON file of prompts."})
    include_empty: bool = field(default=True, metadata={"help": "Score the empty prompt (no instruction) too."})
    prompts_per_query: int = field(default=0, metadata={
        "help": "Score only this many pool prompts per train query, drawn per query (seeded); 0 = every prompt. "
                "D0 then covers more queries for the same target calls, which a query-dependent policy needs."})
    shots: int = field(default=0, metadata={"help": "Few-shot demonstrations per query (0 = zero-shot)."})
    seed: int = field(default=0, metadata={"help": "Seed of the splits and demonstrations."})
    data_dir: str | None = field(default=None, metadata={"help": "Data collection root (default: $QPO_DATA)."})
    batch_size: int = field(default=16, metadata={"help": "Pairs per forward pass on a local target."})
    chunk_size: int = field(default=64, metadata={"help": "Pairs scored between two progress saves."})
    target_concurrency: int = field(default=8, metadata={"help": "Chat-model target: calls in flight at once."})
    target_retries: int = field(default=3, metadata={
        "help": "Chat-model target: retries of a failed call (exponential backoff) before the pair is recorded as failed."})
    target_timeout: float | None = field(default=None, metadata={
        "help": "Chat-model target: seconds before a call without a reply fails (and is retried)."})
    rewards: RewardConfig = field(default_factory=RewardConfig)

    def __post_init__(self) -> None:
        if isinstance(self.rewards, dict):
            self.rewards = RewardConfig(**self.rewards)
        may_be_zero = ("collect_queries", "test_queries", "target_retries", "prompts_per_query")
        for name in ("queries", "batch_size", "chunk_size", "target_concurrency", *may_be_zero):
            if getattr(self, name) < (0 if name in may_be_zero else 1):
                allowed = " or 0" if name in may_be_zero else ""
                raise ValueError(f"{name} must be positive{allowed}; got {getattr(self, name)}.")
        if self.target_timeout is not None and self.target_timeout <= 0:
            raise ValueError(f"target_timeout must be a number of seconds > 0; got {self.target_timeout}.")
        if self.shots < 0:
            raise ValueError(f"shots must be >= 0; got {self.shots}.")

    def split_args(self) -> dict[str, Any]:
        return {"seed": self.seed, "n_train": self.queries, "n_collect": self.collect_queries,
                "n_test": self.test_queries}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class PromptStats:
    prompt_id: str
    prompt: str
    accuracy: float
    n: int


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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# -- run directory -------------------------------------------------------------------------


@dataclass
class Run:
    """An opened run directory: the config it was made with, its task, splits, cache and dataset."""

    directory: Path
    config: CollectConfig
    task: Task
    splits: Splits

    @classmethod
    def open(cls, directory: str | os.PathLike[str], config: CollectConfig | None = None) -> Run:
        """Open ``directory``; with ``config``, create it or check it matches what the run was made with."""
        directory = Path(directory)
        run_file = directory / RUN_FILE
        if run_file.exists():
            data = json.loads(run_file.read_text(encoding="utf-8"))
            if isinstance(data.get("rewards"), dict):
                data["rewards"].setdefault("nll", "vocab")  # runs made before the choice existed
            stored = CollectConfig(**data)
            if config is not None:
                _check_same_run(stored, config, directory)
                # How to call the target is not part of the run's identity: a resume may change it.
                stored = replace(stored, target_concurrency=config.target_concurrency,
                                 target_retries=config.target_retries, target_timeout=config.target_timeout)
            config = stored
        elif config is None:
            raise FileNotFoundError(f"{directory} is not a QPO run directory (no {RUN_FILE}); run `qpo collect` first.")
        task = get_task(config.task)
        splits = task.splits(config.data_dir, **config.split_args())
        if not run_file.exists():  # only a run whose task and splits load is recorded
            resolve_prompts(task, config.prompts, config.include_empty)
            atomic_write_json(run_file, config.to_dict())
        return cls(directory, config, task, splits)

    def dataset(self) -> OfflineDataset:
        return OfflineDataset(self.directory)

    def cache(self) -> ScoreCache:
        return ScoreCache(self.directory / SCORES_FILE)

    def make_target(self, spec: str | None = None, batch_size: int | None = None) -> Target:
        return make_target(spec or self.config.target, cache_path=self.directory / SCORES_FILE,
                           batch_size=batch_size or self.config.batch_size,
                           max_concurrency=self.config.target_concurrency, max_retries=self.config.target_retries,
                           timeout_seconds=self.config.target_timeout)

    def pairs(self, examples: Sequence[Example], prompts: Sequence[tuple[str, str]]) -> list[Pair]:
        """Pairs (example x prompt) with the example's fixed demonstrations; ``prompts`` are (source, text)."""
        return [Pair(e, text, source, self.demos(e)) for e in examples for source, text in prompts]

    def d0_pairs(self, prompts: Sequence[tuple[str, str]]) -> list[Pair]:
        """D0's pairs: every train query with every prompt, or with ``prompts_per_query`` of them.

        The subset is drawn per query from (seed, query id), so it does not depend on the order or
        number of train queries, and a resumed collect asks for the same pairs; pool order is kept.
        """
        k = self.config.prompts_per_query
        if not k or k >= len(prompts):
            return self.pairs(self.splits.train, prompts)
        out: list[Pair] = []
        for example in self.splits.train:
            rng = random.Random(f"{self.config.seed}:d0:{example.id}")
            chosen = sorted(rng.sample(range(len(prompts)), k))
            out.extend(self.pairs([example], [prompts[i] for i in chosen]))
        return out

    def demos(self, example: Example) -> tuple[Demo, ...]:
        """The example's few-shot demonstrations (fixed per query and seed; empty when zero-shot)."""
        return self.task.demos_for(example, self.splits.train, self.config.shots, self.config.seed)


def _check_same_run(stored: CollectConfig, asked: CollectConfig, directory: Path) -> None:
    keys = ("task", "target", "queries", "collect_queries", "test_queries", "shots", "seed", "prompts",
            "include_empty", "prompts_per_query", "rewards")
    diffs = [f"{k}: run has {getattr(stored, k)!r}, asked {getattr(asked, k)!r}" for k in keys
             if getattr(stored, k) != getattr(asked, k)]
    if diffs:
        raise ValueError(
            f"{directory} holds a run made with other settings ({'; '.join(diffs)}). "
            "Use a new --out directory, or repeat the original settings to resume."
        )


def resolve_prompts(task: Task, spec: str, include_empty: bool) -> list[tuple[str, str]]:
    """(prompt_source, text) for the pool: 'all', a count, or a JSON file (list of strings or of {id, text})."""
    if spec == "all" or spec.isdigit():
        pool = [(f"pool:{p['id']}", p["text"]) for p in load_prompt_pool(task.name)]
        if spec.isdigit():  # N prompts spread evenly over the pool, so every style is represented
            count = min(int(spec), len(pool))
            pool = [pool[i * len(pool) // count] for i in range(count)] if count else []
    else:
        path = Path(spec)
        try:
            items = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"--prompts {spec!r}: expected 'all', a number, or a JSON file of prompts ({exc}).") from exc
        if isinstance(items, dict):
            items = items.get("prompts", [])
        pool = []
        for index, item in enumerate(items):
            if isinstance(item, str):
                pool.append((f"file:{index}", item))
            elif isinstance(item, dict) and isinstance(item.get("text"), str):
                pool.append((f"file:{item.get('id', index)}", item["text"]))
            else:
                raise ValueError(f"{path}: prompt #{index} must be a string or an object with 'text'.")
    if include_empty:
        pool.insert(0, ("none", ""))
    if not pool:
        raise ValueError("The prompt pool is empty; pass --prompts all or a file with prompts.")
    return pool


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
            progress: Callable[[int, int], None] | None = None) -> CollectSummary:
    """Score the pool on the train queries, append D0 (loop 0) to the dataset, write the summary.

    ``progress(done, total)`` is called as pairs finish (the CLI draws a bar).
    """
    run = Run.open(out, config)
    prompts = resolve_prompts(run.task, config.prompts, config.include_empty)
    pairs = run.d0_pairs(prompts)
    target = target or run.make_target()
    logger.info("Scoring %d pairs (%d queries x %d of %d prompts) on %s", len(pairs), len(run.splits.train),
                len(pairs) // max(1, len(run.splits.train)), len(prompts), target.id)

    done = 0

    def advance(n: int) -> None:
        nonlocal done
        done += n
        if progress:
            progress(done, len(pairs))

    scores = score_pairs(target, run.task, pairs, config.chunk_size, advance)

    dataset = run.dataset()
    written = dataset.append(make_records(run.task, target.id, pairs, scores, loop=0, rewards=config.rewards))
    summary = summarize(run.task, target.id, pairs, scores, prompts, written, len(dataset))
    atomic_write_json(run.directory / SUMMARY_FILE, summary.to_dict())
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
