"""A QPO run directory: where every file of a run lives (:class:`RunPaths`) and the opened run (:class:`Run`).

A run directory holds everything a QPO run makes::

    run.json                      what was asked (task, splits, seed, target, shots, rewards)
    scores.sqlite                 every target verdict, committed as it comes (resume = cache hits)
    dataset.jsonl                 the offline dataset (append-only, checksummed records)
    collect.json                  the D0 summary (accuracy per prompt, oracle, calls, tokens)
    imported.json                 instead of run.json: a D0 imported from logs (`qpo import-oirl`), no target
    prompts.json                  the induced candidate instructions (kept, dropped and why), with --induce
    mutations.json                the variations of D0's best prompts (kept, dropped and why), with --mutate
    policy/buckets.json           the reward buckets, fixed from D0 at loop 1
    policy/loop_<t>/checkpoint/   the policy after loop t (model, tokenizer, qpo_policy.json)
    policy/loop_<t>/metrics.json  loop t's metrics; a loop with this file is done
    bundle/                       the run's exported bundle (`qpo export --run`)
    bench/bundles/loop_<t>/       the benchmark's bundle of loop t's checkpoint
    results.json                  `qpo eval`'s results; quickstart.json: `qpo quickstart`'s

:class:`RunPaths` is the one place these names are spelled; code that reads or writes a run
asks it for the path.
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qpo_middleware.template import Demo, Template

from .config import CollectConfig
from .io import atomic_write_json
from .targets import Pair, ScoreCache, Target, make_target
from .tasks import Example, Splits, Task, TaskError, get_task, names_one_label, resolve_prompts

if TYPE_CHECKING:
    from .dataset import OfflineDataset
    from .induce import InducedPool, Inducer

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunPaths:
    """The layout of a run directory: every file and folder of a run, by name. Touches no disk."""

    root: Path  # a str or PathLike is turned into a Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    # -- collect --------------------------------------------------------------------------
    @property
    def run_file(self) -> Path:
        """``run.json``: the :class:`~.config.CollectConfig` the run was made with."""
        return self.root / "run.json"

    @property
    def scores(self) -> Path:
        """``scores.sqlite``: the target's verdicts (:class:`~.targets.ScoreCache`)."""
        return self.root / "scores.sqlite"

    @property
    def dataset(self) -> Path:
        """``dataset.jsonl``: the offline dataset (:class:`~.dataset.OfflineDataset`)."""
        return self.root / "dataset.jsonl"

    @property
    def collect_summary(self) -> Path:
        """``collect.json``: the D0 summary of ``qpo collect``."""
        return self.root / "collect.json"

    @property
    def imported(self) -> Path:
        """``imported.json``: where an imported D0 came from (:class:`ImportedLogs`); such a directory has no ``run.json``."""
        return self.root / "imported.json"

    @property
    def induced_prompts(self) -> Path:
        """``prompts.json``: the induced prompt pool (:class:`~.induce.InducedPool`), reused on resume."""
        return self.root / "prompts.json"

    @property
    def mutated_prompts(self) -> Path:
        """``mutations.json``: the pool's variations written by ``collect --mutate`` (:class:`~.induce.InducedPool`)."""
        return self.root / "mutations.json"

    # -- train ----------------------------------------------------------------------------
    @property
    def policy(self) -> Path:
        """``policy/``: the loops' checkpoints and metrics."""
        return self.root / "policy"

    @property
    def buckets(self) -> Path:
        """``policy/buckets.json``: the reward buckets, fixed from D0 at loop 1."""
        return self.policy / "buckets.json"

    def loop(self, loop: int) -> Path:
        """``policy/loop_<t>/``: the output directory of loop ``loop``'s fine-tune."""
        return self.policy / f"loop_{loop}"

    def metrics(self, loop: int) -> Path:
        """``policy/loop_<t>/metrics.json``: written last, so a loop with it is done."""
        return self.loop(loop) / "metrics.json"

    def checkpoint(self, loop: int) -> Path:
        """``policy/loop_<t>/checkpoint/``: the policy after loop ``loop``."""
        return self.loop(loop) / "checkpoint"

    # -- export, evaluate, benchmark ------------------------------------------------------
    @property
    def bundle(self) -> Path:
        """``bundle/``: the run's exported bundle (``qpo export --run``, ``qpo quickstart``)."""
        return self.root / "bundle"

    @property
    def eval_results(self) -> Path:
        """``results.json``: what ``qpo eval --out RUN`` writes."""
        return self.root / "results.json"

    @property
    def quickstart_report(self) -> Path:
        """``quickstart.json``: the results of ``qpo quickstart``."""
        return self.root / "quickstart.json"

    @property
    def bench(self) -> Path:
        """``bench/``: the benchmark's files."""
        return self.root / "bench"

    @property
    def bench_bundles(self) -> Path:
        """``bench/bundles/``: the benchmark's bundles, one per loop."""
        return self.bench / "bundles"

    def bench_bundle(self, loop: int) -> Path:
        """``bench/bundles/loop_<t>/``: the benchmark's bundle of loop ``loop``'s checkpoint."""
        return self.bench_bundles / f"loop_{loop}"

    def is_run(self) -> bool:
        """Whether the directory holds a run (its ``run.json``)."""
        return self.run_file.is_file()


@dataclass(frozen=True)
class ImportedLogs:
    """A D0 imported from another system's logs (``qpo import-oirl``): no target to call, no splits.

    Loop 1 trains on it like on a collected D0; later loops, which score new prompts, need a target.
    """

    source: str  # e.g. "prompt_oirl/gsm8k/train"
    task: str
    target: str  # the logged model, not one this machine can call
    template: Template  # how the logged model was given the prompt and the query

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "task": self.task, "target": self.target, "template": self.template.to_dict()}

    @classmethod
    def read(cls, paths: RunPaths) -> ImportedLogs:
        try:
            data = json.loads(paths.imported.read_text(encoding="utf-8"))
            return cls(source=str(data["source"]), task=str(data["task"]), target=str(data["target"]),
                       template=Template.from_dict(data["template"]))
        except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"Cannot read {paths.imported}: {exc}; re-run the import (`qpo import-oirl --out "
                             f"{paths.root}`) to rewrite it.") from exc

    def write(self, paths: RunPaths) -> None:
        atomic_write_json(paths.imported, self.to_dict())


@dataclass
class Run:
    """An opened run directory: the config it was made with, its task, splits, cache and dataset."""

    directory: Path
    config: CollectConfig
    task: Task
    splits: Splits
    paths: RunPaths = field(init=False)

    def __post_init__(self) -> None:
        self.paths = RunPaths(self.directory)

    @classmethod
    def open(cls, directory: str | os.PathLike[str], config: CollectConfig | None = None) -> Run:
        """Open ``directory``; with ``config``, create it or check it matches what the run was made with."""
        paths = RunPaths(Path(directory))
        if paths.run_file.exists():
            data = json.loads(paths.run_file.read_text(encoding="utf-8"))
            if isinstance(data.get("rewards"), dict):
                data["rewards"].setdefault("nll", "vocab")  # runs made before the choice existed
            stored = CollectConfig(**data)
            if config is not None:
                _check_same_run(stored, config, paths.root)
                # How to call the target is not part of the run's identity: a resume may change it.
                stored = replace(stored, target_concurrency=config.target_concurrency,
                                 target_retries=config.target_retries, target_timeout=config.target_timeout)
            config = stored
        elif config is None:
            raise FileNotFoundError(
                f"{paths.root} is not a QPO run directory (no {paths.run_file.name}); run `qpo collect` first.")
        task = get_task(config.task)
        if config.mutate_plain and task.kind != "classification":
            raise TaskError(f"--mutate-plain judges which prompts steer the target to one label; {task.name} is a "
                            f"{task.kind} task. Mutate without it.")
        splits = task.splits(config.data_dir, **config.split_args())
        if not paths.run_file.exists():  # only a run whose task and splits load is recorded
            resolve_prompts(task, config.prompts, config.include_empty)
            atomic_write_json(paths.run_file, config.to_dict())
        return cls(paths.root, config, task, splits)

    def dataset(self) -> OfflineDataset:
        from .dataset import OfflineDataset  # the dataset module reads its file name from RunPaths

        return OfflineDataset(self.directory)

    def cache(self) -> ScoreCache:
        return ScoreCache(self.paths.scores)

    def make_target(self, spec: str | None = None, batch_size: int | None = None) -> Target:
        return make_target(spec or self.config.target, cache_path=self.paths.scores,
                           batch_size=batch_size or self.config.batch_size,
                           max_concurrency=self.config.target_concurrency, max_retries=self.config.target_retries,
                           timeout_seconds=self.config.target_timeout)

    def prompts(self, inducer: Inducer | None = None, progress: Callable[[int], None] | None = None) -> list[tuple[str, str]]:
        """The run's prompt pool as (source, text): :meth:`base_prompts`, then the mutated ones once written
        (:meth:`mutated`)."""
        grown = self.mutated()
        return self.base_prompts(inducer, progress) + (grown.prompts if grown else [])

    def base_prompts(self, inducer: Inducer | None = None,
                     progress: Callable[[int], None] | None = None) -> list[tuple[str, str]]:
        """The pool before mutation: the given prompts, then the induced ones (:meth:`induced`)."""
        given = resolve_prompts(self.task, self.config.prompts, self.config.include_empty)
        pool = self.induced(inducer, progress, existing=[text for _, text in given])
        prompts = given + (pool.prompts if pool else [])
        if not prompts:
            raise TaskError(f"The prompt pool of {self.directory} is empty: the inducer's {pool.asked if pool else 0} "
                            f"candidates were all dropped ({pool.drop_counts() if pool else {}}). Ask for more with "
                            "--induce, try another --inducer, or add --prompts.")
        return prompts

    def induced(self, inducer: Inducer | None = None, progress: Callable[[int], None] | None = None,
                existing: Sequence[str] = ()) -> InducedPool | None:
        """The induced candidates (``prompts.json``), None without ``--induce``.

        Made once, by ``inducer`` (default: the configured ``inducer`` model), from the train split;
        a resumed run reads them back and never induces again.
        """
        from .induce import induce, load_pool, make_inducer, save_pool

        config = self.config
        if not config.induce:
            return None
        path = self.paths.induced_prompts
        if path.is_file():
            pool = load_pool(path)
            if (pool.asked, pool.inducer, pool.shots, pool.seed) != (config.induce, config.inducer,
                                                                     config.induce_shots, config.seed):
                raise ValueError(f"{path} was induced with other settings than {self.paths.run_file} holds; "
                                 f"delete {path.name} to induce again.")
            logger.info("Reusing %d induced prompts from %s", len(pool.kept), path)
            return pool
        logger.info("Inducing %d candidate prompts with %s", config.induce, config.inducer)
        pool = induce(self.task, self.splits.train, config.induce, inducer or make_inducer(config.inducer),
                      inducer_id=config.inducer, shots=config.induce_shots, seed=config.seed, existing=existing,
                      progress=progress)
        save_pool(path, pool)
        return pool

    def mutated(self) -> InducedPool | None:
        """The variations ``collect --mutate`` wrote (``mutations.json``); None before then, or without ``--mutate``."""
        from .induce import load_pool

        path = self.paths.mutated_prompts
        return load_pool(path) if self.config.mutate and path.is_file() else None

    def grow(self, base: Sequence[tuple[str, str]], accuracy: dict[str, float], inducer: Inducer | None = None,
             steering: Collection[str] = ()) -> InducedPool:
        """Write ``mutate`` variations of the ``mutate_from`` prompts of ``base`` most accurate on D0 (``accuracy``:
        text -> D0 accuracy; none that names exactly one label word, nor the empty prompt, nor with ``mutate_plain``
        one of ``steering``, the texts that steer the target on D0), in turn, and keep them in ``mutations.json``.
        A resumed run reads them back and never mutates again."""
        from .induce import InducedPool, make_inducer, mutate, save_pool

        config = self.config
        if (grown := self.mutated()) is not None:
            if (grown.asked, grown.inducer, grown.from_top, grown.seed, grown.plain) != (
                    config.mutate, config.inducer, config.mutate_from, config.seed, config.mutate_plain):
                raise ValueError(f"{self.paths.mutated_prompts} was written with other settings than "
                                 f"{self.paths.run_file} holds; delete {self.paths.mutated_prompts.name} to mutate again.")
            logger.info("Reusing %d mutated prompts from %s", len(grown.kept), self.paths.mutated_prompts)
            return grown
        skip = set(steering) if config.mutate_plain else set()
        order = sorted((i for i, (_, text) in enumerate(base)
                        if text and not names_one_label(text, self.task.labels) and text not in skip),
                       key=lambda i: (-accuracy.get(base[i][1], 0.0), i))
        if not order:
            if skip:
                raise TaskError(f"--mutate-plain found no pool prompt to vary: every scored prompt is empty, names one "
                                f"label word or steers the target on D0 ({len(skip)} steer); mutate without "
                                "--mutate-plain, or give a larger pool (--prompts).")
            raise TaskError("--mutate needs a pool prompt to vary: every scored prompt is empty or names one label word.")
        originals = [base[order[i % min(config.mutate_from, len(order))]] for i in range(config.mutate)]
        logger.info("Writing %d variations of the %d best D0 prompts%s with %s", config.mutate,
                    min(config.mutate_from, len(order)), " that do not steer the target" if skip else "",
                    config.inducer)
        candidates = mutate(self.task, [text for _, text in originals], inducer or make_inducer(config.inducer),
                            seed=config.seed, existing=[text for _, text in base])
        for candidate, (source, _) in zip(candidates, originals, strict=True):
            candidate.of = source
        grown = InducedPool(inducer=config.inducer, asked=config.mutate, shots=0, seed=config.seed,
                            kept=[c for c in candidates if c.reason is None],
                            dropped=[c for c in candidates if c.reason is not None], from_top=config.mutate_from,
                            plain=config.mutate_plain)
        save_pool(self.paths.mutated_prompts, grown)
        return grown

    def pairs(self, examples: Sequence[Example], prompts: Sequence[tuple[str, str]]) -> list[Pair]:
        """Pairs (example x prompt) with the example's fixed demonstrations; ``prompts`` are (source, text)."""
        return [Pair(e, text, source, self.demos(e)) for e in examples for source, text in prompts]

    def d0_pairs(self, prompts: Sequence[tuple[str, str]]) -> list[Pair]:
        """D0's pairs: every train query with every prompt, or with ``prompts_per_query`` of them.

        The subset is drawn per query from (seed, query id), so it does not depend on the order or
        number of train queries, and a resumed collect asks for the same pairs; pool order is kept.
        """
        return self._drawn_pairs(prompts, self.config.prompts_per_query, "d0")

    def mutation_pairs(self, base_size: int, grown: Sequence[tuple[str, str]]) -> list[Pair]:
        """D0's pairs of the mutated prompts ``grown``: every train query with each, or, with ``prompts_per_query``
        k, with ``round(k * len(grown) / base_size)`` of them (at least one), so that a variation is scored on about
        as many queries as a base prompt. Drawn per query from (seed, query id), like :meth:`d0_pairs`."""
        k = self.config.prompts_per_query
        if not grown:
            return []
        if not k or k >= base_size:
            return self.pairs(self.splits.train, grown)
        return self._drawn_pairs(grown, min(len(grown), max(1, round(k * len(grown) / base_size))), "mutate")

    def _drawn_pairs(self, prompts: Sequence[tuple[str, str]], k: int, tag: str) -> list[Pair]:
        """Every train query with ``k`` of ``prompts`` (all of them when ``k`` is 0 or covers them), drawn per query
        from (seed, ``tag``, query id); pool order is kept."""
        if not k or k >= len(prompts):
            return self.pairs(self.splits.train, prompts)
        out: list[Pair] = []
        for example in self.splits.train:
            rng = random.Random(f"{self.config.seed}:{tag}:{example.id}")
            chosen = sorted(rng.sample(range(len(prompts)), k))
            out.extend(self.pairs([example], [prompts[i] for i in chosen]))
        return out

    def demos(self, example: Example) -> tuple[Demo, ...]:
        """The example's few-shot demonstrations (fixed per query and seed; empty when zero-shot)."""
        return self.task.demos_for(example, self.splits.train, self.config.shots, self.config.seed)


def _check_same_run(stored: CollectConfig, asked: CollectConfig, directory: Path) -> None:
    keys = ("task", "target", "queries", "collect_queries", "test_queries", "dev_queries", "shots", "seed", "prompts",
            "include_empty", "prompts_per_query", "rewards", "induce", "mutate")
    if stored.induce or asked.induce:  # which model induced, and from how many examples, matters only then
        keys += ("inducer", "induce_shots")
    if stored.mutate or asked.mutate:
        keys += ("mutate_from", "mutate_plain") + (() if "inducer" in keys else ("inducer",))
    diffs = [f"{k}: run has {getattr(stored, k)!r}, asked {getattr(asked, k)!r}" for k in keys
             if getattr(stored, k) != getattr(asked, k)]
    if diffs:
        raise ValueError(
            f"{directory} holds a run made with other settings ({'; '.join(diffs)}). "
            "Use a new --out directory, or repeat the original settings to resume."
        )
