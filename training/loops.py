"""Multi-loop offline RL (QPO): fine-tune, sample, score, filter, merge — and again.

Loop 1 fine-tunes the base model on D0. Each later loop t:

1. samples K prompts per held-out "collect" query from the policy of loop t-1,
   conditioned on the top reward bucket. A policy trained by preference alone
   (``preference="instead"``) ranks prompts rather than writing them: it samples K
   distinct prompts of the library (every prompt scored so far) by its 'choose'
   score, so the loop scores the policy's own picks on new queries and the next
   preference step learns from where they were wrong;
2. scores the new (query, prompt) pairs on the target (cached: resumable);
3. drops empty written prompts, duplicates and pairs below the reward floor (the
   preference-only recipe keeps every pair: its pairs need the wrong prompts);
4. appends the rest to the dataset tagged ``loop=t`` (D_t);
5. fine-tunes the policy of loop t-1 on D_t.

Every loop ends by scoring the greedy policy prompts on the collect split and
writing ``policy/loop_<t>/metrics.json``; a loop with that file is done, so a
re-run resumes at the first unfinished loop. Reward buckets are fixed from D0
at loop 1 (``policy/buckets.json``) so a reward token means the same in every loop.
"""

from __future__ import annotations

import json
import logging
import os
import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from qpo_middleware.bundle import GenerationConfig
from qpo_middleware.choice import RouteTable, choose
from qpo_middleware.policy_format import PolicyFormat
from qpo_middleware.stats import quantile

from .collect import make_records, score_pairs
from .config import LoopConfig, TrainConfig
from .dataset import OfflineDataset, Record, require_labels, steering_prompts
from .export import (
    ChoiceOffsets,
    PolicyMeta,
    read_choice_offsets,
    write_choice_offsets,
    write_policy_meta,
    write_route_table,
)
from .forward import FrozenLayerCache, frozen_layer_cache
from .induce import Inducer, make_inducer, mutate
from .io import atomic_write_json
from .policy import (
    RewardBuckets,
    add_policy_tokens,
    build_examples,
    conditioning_values,
    label_route_data,
    route_table,
    top_bucket_coverage,
)
from .preference import (
    PreferenceExample,
    PreferenceObjective,
    candidate_logps,
    preference_examples,
    preference_pairs,
    with_reference_logps,
)
from .run import ImportedLogs, Run, RunPaths
from .sampling import generate_prompts
from .targets import Pair, Score, Target
from .tasks import Example, TaskError
from .trainer import train_policy

logger = logging.getLogger(__name__)


@dataclass
class LoopMetrics:
    loop: int
    train_records: int
    first_loss: float
    last_loss: float
    train_seconds: float
    sampled_pairs: int = 0
    kept_pairs: int = 0
    mean_reward_sampled: float | None = None
    mean_reward_kept: float | None = None
    mean_reward_d0: float = 0.0
    sampled_accuracy: float | None = None  # the target's accuracy on the loop's sampled pairs (variations included)
    reward_floor: float | None = None
    # The target's accuracy with the prompt the loop's exported bundle serves by default (policy_strategy): the
    # greedy prompt the policy writes, or, with choice offsets, the library prompt strategy 'choose' picks.
    greedy_accuracy_collect: float | None = None  # leaky from loop 2 on: the loops sample and keep prompts there
    greedy_accuracy_dev: float | None = None  # the dev split (never trained or sampled on): chooses the loop
    target_calls: int = 0
    seconds: float = 0.0
    checkpoint: str = ""
    new_distinct_prompts: int = 0  # sampled prompts that no earlier record holds (pool or earlier loops)
    new_distinct_prompts_kept: int = 0
    new_prompt_accuracy: float | None = None  # accuracy of the sampled pairs with such prompts
    preference_pairs: int = 0
    mutation_pairs: int = 0  # variations written and scored this loop (after the filters)
    mutation_accuracy: float | None = None
    preference_first_loss: float | None = None
    preference_last_loss: float | None = None
    policy_strategy: str = "generate"
    route_read: float | None = None  # label_route with route_read_queries: the read the bundle's remap assumes
    # How loops >= 2 drew their prompts: 'generate' (the policy writes them) or 'library' (the policy's 'choose'
    # scores sample among the prompts scored so far); None in loop 1.
    sampling: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def completed_loops(run_dir: str | os.PathLike[str]) -> list[LoopMetrics]:
    """The metrics of loops 1, 2, ... that are done (have ``metrics.json``), in order."""
    paths = RunPaths(run_dir)
    out = []
    loop = 1
    while paths.metrics(loop).is_file():
        out.append(LoopMetrics(**json.loads(paths.metrics(loop).read_text())))
        loop += 1
    return out


def final_checkpoint(run_dir: str | os.PathLike[str]) -> Path:
    """The checkpoint of the last completed loop; a clear error when none is done."""
    done = completed_loops(run_dir)
    if not done:
        raise FileNotFoundError(f"{run_dir} has no trained policy yet; run `qpo train --run {run_dir}` first.")
    return RunPaths(run_dir).checkpoint(done[-1].loop)


# -- the policy (torch) -----------------------------------------------------------------------


def load_policy(checkpoint_or_base: str | os.PathLike[str], train: TrainConfig) -> tuple[Any, Any, PolicyFormat]:
    """Load a base model or a policy checkpoint, make sure it has the policy tokens, and put it on
    the training device (a GPU unless ``train.device`` is cpu)."""
    import torch

    from .models import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(checkpoint_or_base)
    fmt = add_policy_tokens(model, tokenizer, train.num_buckets, train.query_max_tokens, train.prompt_max_tokens,
                            seed=train.seed)
    # Sampling before a loop's training runs on the device the training will use.
    if train.device != "cpu" and torch.cuda.is_available():
        model.to("cuda")
    return model, tokenizer, fmt


# -- the loops ----------------------------------------------------------------------------------


def run_loops(run_dir: str | os.PathLike[str], train: TrainConfig, loops: LoopConfig, *,
              target: Target | None = None, on_step: Callable[[int, int, float], None] | None = None,
              on_phase: Callable[[int, str], None] | None = None) -> list[LoopMetrics]:
    """Run (or resume) loops 1..T of QPO in ``run_dir`` (made by ``qpo collect``, or a D0 imported from
    logs by ``qpo import-oirl``: loop 1 only, as there is no target to score new prompts on)."""
    paths = RunPaths(run_dir)
    imported = ImportedLogs.read(paths) if not paths.is_run() and paths.imported.is_file() else None
    run = None if imported else Run.open(run_dir)
    if imported and loops.loops > 1:
        raise ValueError(f"{paths.root} holds a D0 imported from {imported.source} ({imported.target}): loops 2+ "
                         "score new prompts on the target, which this machine cannot call. Use --loops 1.")
    dataset = OfflineDataset(paths.root)
    task_name, template = (imported.task, imported.template) if imported else (run.task.name, run.task.template)
    d0 = dataset.loop(0)
    if not d0:
        raise ValueError(f"{paths.root} has no D0 records; run `qpo collect --out {paths.root}` first.")
    buckets = fixed_buckets(paths, d0, train.num_buckets, train.conditioning)
    coverage = top_bucket_coverage(d0, buckets)
    if coverage is not None:
        logger.info("conditioning %s: D0's top reward bucket holds a correct prompt for %.0f%% of the queries "
                    "that have one", train.conditioning, 100 * coverage)
    d0_rewards = [r.reward for r in d0]
    d0_accuracy = statistics.fmean(r.correct for r in d0)
    floor = quantile(d0_rewards, loops.reward_floor_quantile)
    # D0's floor is on what the reward token encodes (quantile 0 = D0's lowest: all of D0).
    d0_floor = quantile(conditioning_values(d0, train.conditioning), loops.d0_floor_quantile)
    collect_split = [] if run is None else run.splits.collect[loops.collect_skip :][: loops.collect_queries or None]
    if run is not None and loops.loops > 1 and not collect_split:
        raise ValueError(f"Loops 2+ sample on the collect split, and {paths.root} has no collect query left "
                         f"({len(run.splits.collect)} collected, {loops.collect_skip} skipped). Collect with more "
                         "--collect-queries (or skip fewer: LoopConfig.collect_skip), or train with --loops 1.")
    if run is not None:
        target = target or run.make_target()
    route_queries: list[Record] = []
    if train.route_queries:
        if run is None:
            raise ValueError(f"--route-queries reads more labelled queries from the run's task, and {paths.root} "
                             "holds a D0 imported from logs, with no task data to draw them from. Train without it.")
        route_queries = route_query_records(run, train.route_queries, d0[0])
        logger.info("label_route: %d more labelled queries from the train pool (no target call)", len(route_queries))

    def phase(loop: int, name: str) -> None:
        logger.info("loop %d: %s", loop, name)
        if on_phase:
            on_phase(loop, name)

    done = completed_loops(paths.root)
    inducer: Inducer | None = None  # loaded on the first loop that writes variations
    for loop in range(len(done) + 1, loops.loops + 1):
        started = time.perf_counter()
        previous = paths.checkpoint(loop - 1) if loop > 1 else loops.base_model
        model, tokenizer, fmt = load_policy(previous, train)
        metrics = LoopMetrics(loop=loop, train_records=0, first_loss=0.0, last_loss=0.0, train_seconds=0.0,
                              mean_reward_d0=statistics.fmean(d0_rewards), reward_floor=floor)

        # --- Generate: K prompts per collect query from the previous policy (loops >= 2) -----
        if loop > 1:
            assert run is not None and target is not None
            queries = [e.query for e in collect_split]
            ranks_only = loops.preference == "instead"  # trained by preference alone: it ranks, it does not write
            metrics.sampling = "library" if ranks_only else "generate"
            phase(loop, f"sampling {loops.samples_per_query} prompts x {len(collect_split)} collect queries "
                        f"({metrics.sampling})")
            if ranks_only:
                shift = read_choice_offsets(previous)
                library = sorted(shift.offsets) if shift else sorted({r.prompt for r in dataset if r.loop < loop})
                samples = library_samples(choice_scores(model, tokenizer, fmt, queries, library, shift), library,
                                          loops.samples_per_query, loops.temperature, seed=loops.seed + loop)
            else:
                sampling = GenerationConfig.for_policy(fmt, do_sample=True, top_k=loops.top_k, top_p=loops.top_p,
                                                       temperature=loops.temperature)
                samples = generate_prompts(model, tokenizer, fmt, queries, sampling,
                                           num_samples=loops.samples_per_query, seed=loops.seed + loop,
                                           batch_size=loops.generation_batch_size)
            # --- Score: the new pairs on the target (cached, so a resumed loop pays nothing twice).
            # Only earlier loops' pairs count as seen: records this loop appended before a crash
            # must not drop out of its pairs on resume (that changed its metrics and rewards).
            seen = {(r.query_id, r.prompt) for r in dataset if r.loop < loop}
            pairs = _new_pairs(run, collect_split, samples, dataset_keys=seen, keep_empty=ranks_only)
            phase(loop, f"scoring {len(pairs)} new pairs on {target.id}")
            scores = score_pairs(target, run.task, pairs, run.config.chunk_size)
            if loops.mutations:  # variations of each query's best prompt so far, scored on the query
                inducer = inducer or make_inducer(loops.mutation_model or run.config.inducer)
                known = {r.prompt for r in dataset if r.loop < loop} | {p.prompt for p in pairs}
                variations = mutation_pairs(run, collect_split, pairs, scores, inducer, loops, loop, known, d0)
                phase(loop, f"scoring {len(variations)} prompt variations on {target.id}")
                mutated = score_pairs(target, run.task, variations, run.config.chunk_size)
                valid = [s.correct for s in mutated if not s.failed]
                metrics.mutation_pairs = len(variations)
                metrics.mutation_accuracy = statistics.fmean(valid) if valid else None
                pairs, scores = [*pairs, *variations], [*scores, *mutated]
            metrics.target_calls += sum(not s.cached for s in scores)
            accuracy = shrunk_accuracy(pairs, scores, prior_mean=d0_accuracy, prior_weight=loops.prompt_accuracy_prior)
            records = make_records(run.task, target.id, pairs, scores, loop=loop, rewards=run.config.rewards,
                                   prompt_accuracy=accuracy)
            # --- Filter and merge: keep pairs at or above the reward floor -> D_t. The preference-only recipe
            # keeps every pair: its right-vs-wrong pairs need the wrong prompts (as D0's floor of 0 does).
            kept = records if ranks_only else [r for r in records if r.reward >= floor]
            dataset.append(kept)
            metrics.sampled_pairs, metrics.kept_pairs = len(records), len(kept)
            metrics.mean_reward_sampled = statistics.fmean(r.reward for r in records) if records else None
            metrics.sampled_accuracy = statistics.fmean(r.correct for r in records) if records else None
            metrics.mean_reward_kept = statistics.fmean(r.reward for r in kept) if kept else None
            # --- Exploration: prompts no earlier record holds (not in the pool, not written by an earlier loop)
            known = {r.prompt for r in dataset if r.loop < loop}
            new = [r for r in records if r.prompt not in known]
            metrics.new_distinct_prompts = len({r.prompt for r in new})
            metrics.new_distinct_prompts_kept = len({r.prompt for r in kept if r.prompt not in known})
            metrics.new_prompt_accuracy = statistics.fmean(r.correct for r in new) if new else None

        # --- Fine-tune: on D_{t} (D0's records above its floor, and every later loop's), from the previous policy
        training_records, values = training_data(dataset.records, loop, train.conditioning, d0_floor,
                                                   route_without_steering=train.route_without_steering,
                                                   route_without_leaning=train.route_without_leaning,
                                                   route_distinct=train.route_distinct, route_queries=route_queries)
        examples = [] if loops.preference == "instead" else build_examples(
            training_records, tokenizer, fmt, buckets, values=values, include_empty=train.include_empty)
        config = train if loop == 1 else _later(train, loops)
        state = {"loop": loop, "buckets": buckets.to_dict()}
        if loops.preference != "instead":
            phase(loop, f"fine-tuning on {len(examples)} examples ({config.epochs} epoch(s))")
            result = train_policy(model, tokenizer, examples, config, paths.loop(loop), on_step=on_step,
                                  extra_state=state)
        preferences, offsets = [], None
        if loops.preference != "off":
            # The reference is the policy the preference step starts from, as in DPO after SFT: this loop's
            # supervised policy ('after'), the previous loop's ('instead'). A reference taken before the
            # supervised step would count that step's own gains (largest on long prompts) as preference margin.
            # The frozen layers' output, kept from the reference pass for the preference fine-tune (same weights).
            cache = frozen_layer_cache(model, config)
            preferences = _preference_data(model, tokenizer, fmt, dataset.records, loop, loops, cache)
            metrics.preference_pairs = len(preferences)
            if preferences and loops.choice_offset_queries:
                phase(loop, f"choice offsets of the library prompts on {loops.choice_offset_queries} queries")
                offsets = library_offsets(model, tokenizer, fmt, dataset.records, loop, loops.choice_offset_queries,
                                          seed=loops.seed + loop)
        if preferences:
            preference = replace(config, epochs=loops.preference_epochs,
                                 learning_rate=loops.preference_learning_rate or config.learning_rate)
            phase(loop, f"preference training on {len(preferences)} pairs ({preference.epochs} epoch(s))")
            preferred = train_policy(model, tokenizer, preferences, preference, paths.loop(loop), on_step=on_step,
                                     objective=PreferenceObjective(beta=loops.preference_beta), extra_state=state,
                                     cache=cache)
            cache = None  # its memory back before sampling
            metrics.preference_first_loss, metrics.preference_last_loss = preferred.first_loss, preferred.last_loss
            if loops.preference == "instead":
                result = preferred
        elif loops.preference == "instead":
            raise ValueError(f"--preference instead found no query with both a right and a wrong prompt in "
                             f"{paths.dataset} (loop {loop}); use --preference after or off.")
        checkpoint = paths.checkpoint(loop)
        write_policy_meta(checkpoint, PolicyMeta(policy=fmt, template=template, task=task_name,
                                                 base_model=loops.base_model,
                                                 training_data_sha256=dataset.content_hash()))
        if offsets is not None:
            write_choice_offsets(checkpoint, offsets)
        routes = None
        if train.conditioning == "label_route":  # what its bundle's 'choose' sends by: the routes it trained on
            routes = route_table([r for r in dataset.records if r.loop <= loop],
                                 without_steering=train.route_without_steering,
                                 without_leaning=train.route_without_leaning, distinct=train.route_distinct)
            if train.route_read_queries:
                routes = with_route_read(model, tokenizer, fmt, routes, run, collect_split, train.route_read_queries)
                metrics.route_read = routes.read
            write_route_table(checkpoint, routes)
        metrics.train_records = len(examples)
        metrics.first_loss, metrics.last_loss, metrics.train_seconds = result.first_loss, result.last_loss, result.seconds
        metrics.checkpoint = str(checkpoint)

        # --- Evaluate: the policy's prompts (as its bundle serves them) on the collect and dev splits ----
        metrics.policy_strategy = "generate" if offsets is None and routes is None else "choose"
        if loops.eval_greedy and run is not None and target is not None:
            for split, examples in (("collect", collect_split), ("dev", run.splits.dev)):
                if not examples:
                    continue
                phase(loop, f"scoring the policy's prompts ({metrics.policy_strategy}) on the {split} split")
                accuracy, calls = greedy_accuracy(model, tokenizer, fmt, run, target, examples, loops, offsets,
                                                  routes)
                setattr(metrics, f"greedy_accuracy_{split}", accuracy)
                metrics.target_calls += calls

        metrics.seconds = time.perf_counter() - started
        atomic_write_json(paths.metrics(loop), metrics.to_dict())
        done.append(metrics)
        del model
    return done


def with_route_read(model: Any, tokenizer: Any, fmt: PolicyFormat, routes: RouteTable, run: Run | None,
                    held_out: Sequence[Example], count: int) -> RouteTable:
    """``routes`` set to rule remap (:attr:`RouteTable.read`) at the policy's route read: the share of up to
    ``count`` held-out queries (``held_out``: the collect split, which no loop-1 training sees) whose top-scoring
    route is their gold label's. Reads labels only: no target call. Unchanged without such queries."""
    if run is None:
        logger.warning("label_route: imported logs have no held-out labelled queries to measure the route read on; "
                       "the bundle sends by the label posterior")
        return routes
    route_of = {label: r for r, group in enumerate(routes.route_labels) for label in group}
    golds = [(e, routes.labels.index(g)) for e in held_out if (g := run.task.gold_text(e)) in routes.labels][:count]
    if not golds:
        logger.warning("label_route: no held-out collect query with a routed label to measure the route read on; "
                       "the bundle sends by the label posterior (collect with more --collect-queries)")
        return routes
    scores = candidate_logps(model, tokenizer, fmt, [e.query for e, _ in golds], list(routes.routes),
                             (fmt.top_bucket,))[0].numpy()
    read = statistics.fmean(int(top) == route_of[g] for top, (_, g) in zip(scores.argmax(-1), golds, strict=True))
    remapped = replace(routes, read=read)
    sent = remapped.sent_by_route()
    logger.info("label_route: the policy's top route is the gold label's on %.0f%% of %d held-out queries; "
                "the bundle sends by rule remap (%d of %d routes send another prompt)", 100 * read, len(golds),
                sum(prompt != route for route, prompt in sent.items()), len(sent))
    return remapped


def greedy_accuracy(model: Any, tokenizer: Any, fmt: PolicyFormat, run: Run, target: Target,
                    examples: Sequence[Example], loops: LoopConfig,
                    offsets: ChoiceOffsets | None = None,
                    routes: RouteTable | None = None) -> tuple[float, int]:
    """The target's accuracy with the policy's prompt per query, and the target calls it took: its greedy prompt,
    or with ``offsets`` the library prompt strategy 'choose' picks (log-probability after the top token minus the
    prompt's offset), or with ``routes`` the prompt the route table sends by the routes' log-probabilities, as the
    exported bundle serves them."""
    queries = [e.query for e in examples]
    if routes is not None:
        scores = candidate_logps(model, tokenizer, fmt, queries, list(routes.routes), (fmt.top_bucket,))[0].numpy()
        prompts = [routes.prompts[i] for i in routes.pick(scores)]
    elif offsets is None:
        prompts = [g[0] for g in generate_prompts(model, tokenizer, fmt, queries, GenerationConfig.for_policy(fmt),
                                                  batch_size=loops.generation_batch_size)]
    else:
        texts = list(offsets.offsets)
        prompts = [texts[choose(row, None)] for row in choice_scores(model, tokenizer, fmt, queries, texts, offsets)]
    pairs = [Pair(e, prompt, "policy", run.demos(e)) for e, prompt in zip(examples, prompts, strict=True)]
    scores = score_pairs(target, run.task, pairs, run.config.chunk_size)
    valid = [s for s in scores if not s.failed]
    return sum(s.correct for s in valid) / max(1, len(valid)), sum(not s.cached for s in scores)


def choice_scores(model: Any, tokenizer: Any, fmt: PolicyFormat, queries: Sequence[str], library: Sequence[str],
                  offsets: ChoiceOffsets | None) -> np.ndarray:
    """Strategy 'choose''s score of every ``library`` prompt for every query, as the exported bundle computes it:
    the log-probability after the top reward token, less the prompt's offset when ``offsets`` holds one. Shape
    ``(len(queries), len(library))``."""
    scores = candidate_logps(model, tokenizer, fmt, queries, library, (fmt.top_bucket,))[0].numpy().astype(np.float64)
    if offsets is not None:
        scores -= np.array([offsets.offsets.get(text, 0.0) for text in library])
    return scores


def library_samples(scores: np.ndarray, library: Sequence[str], k: int, temperature: float, *,
                    seed: int) -> list[list[str]]:
    """Per query (a row of ``scores``), ``k`` distinct ``library`` prompts drawn without replacement from
    ``softmax(scores / temperature)`` (Gumbel top-k): a choosing policy's own exploration. Its favourite comes
    first most often, and a prompt it scores far below the rest is rarely drawn."""
    if scores.shape[1] != len(library):
        raise ValueError(f"library_samples got {scores.shape[1]} scores per query for {len(library)} prompts.")
    keys = scores / temperature + np.random.default_rng(seed).gumbel(size=scores.shape)
    order = np.argsort(-keys, axis=1, kind="stable")[:, :k]
    return [[library[i] for i in row] for row in order]


def chosen_loop(done: Sequence[LoopMetrics]) -> tuple[LoopMetrics, str]:
    """The loop whose policy to keep, and why: the best greedy accuracy on the dev split (the earliest on a
    tie) when every loop was scored there; otherwise the last loop."""
    if not done:
        raise ValueError("No loop is done yet.")
    if all(m.greedy_accuracy_dev is not None for m in done):
        best = max(done, key=lambda m: (m.greedy_accuracy_dev, -m.loop))
        return best, f"best policy accuracy on the dev split ({best.greedy_accuracy_dev:.1%})"
    return done[-1], "the last loop (no dev split)"


def _preference_data(model: Any, tokenizer: Any, fmt: PolicyFormat, records: Sequence[Record], loop: int,
                     loops: LoopConfig, cache: FrozenLayerCache | None = None) -> list[PreferenceExample]:
    """This loop's preference pairs (every record up to the loop) with the reference log-probs of ``model``."""
    steering: dict[str, str] = {}
    if loops.preference_without_steering:
        d0 = [r for r in records if r.loop == 0]
        require_labels(d0, "preference_without_steering judges which D0 prompts steer the target to one label",
                       "drop --preference-without-steering")
        steering = steering_prompts(d0)
        logger.info("loop %d: %d of %d D0 prompts steer the target to one label and are never a chosen prompt",
                    loop, len(steering), len({r.prompt for r in d0}))
    pairs = preference_pairs([r for r in records if r.loop <= loop], loops.preference_pairs_per_query,
                             seed=loops.seed + loop, label_smoothing=loops.preference_label_smoothing,
                             exclude_chosen=steering)
    if not pairs:
        logger.warning("loop %d: no query has both a right and a wrong prompt: no preference pairs", loop)
        return []
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return with_reference_logps(model, preference_examples(pairs, tokenizer, fmt), pad_id,
                                batch_size=loops.generation_batch_size, cache=cache)


def library_offsets(model: Any, tokenizer: Any, fmt: PolicyFormat, records: Sequence[Record], loop: int,
                    queries: int, *, seed: int) -> ChoiceOffsets:
    """Strategy 'choose''s offset of every prompt the loop's library holds (the distinct prompts of the records up
    to ``loop``, as export writes them): its mean log-probability under ``model`` (the preference step's reference)
    after the top reward token, over ``queries`` training queries drawn with ``seed``."""
    upto = [r for r in records if r.loop <= loop]
    prompts = sorted({r.prompt for r in upto})
    texts = {r.query_id: r.query for r in upto}
    ids = sorted(texts)
    drawn = random.Random(seed).sample(ids, min(queries, len(ids)))
    started = time.perf_counter()
    scores = candidate_logps(model, tokenizer, fmt, [texts[i] for i in drawn], prompts, (fmt.top_bucket,))[0]
    logger.info("choice offsets: %d prompts x %d queries in %.0f s", len(prompts), len(drawn),
                time.perf_counter() - started)
    return ChoiceOffsets(offsets=dict(zip(prompts, scores.mean(0).tolist(), strict=True)), queries=len(drawn))


def route_query_records(run: Run, count: int, template: Record) -> list[Record]:
    """``count`` more labelled queries for ``label_route`` (``TrainConfig.route_queries``): the task's train pool
    after the run's own train, collect and dev queries, so none is in any split of the run. Each is a copy of
    ``template`` with its id, text and gold label, and no prompt or verdict (nothing is scored on it)."""
    config = run.config
    taken = {e.id for split in (run.splits.train, run.splits.collect, run.splits.test, run.splits.dev) for e in split}
    try:
        pool = run.task.splits(config.data_dir, **{**config.split_args(), "n_dev": config.dev_queries + count}).dev
    except TaskError as exc:
        raise ValueError(f"--route-queries {count}: {exc}") from exc
    more = [e for e in pool if e.id not in taken][:count]
    if len(more) < count:  # e.g. a collect split of 'the rest' (collect_queries None) holds the pool's tail
        raise ValueError(f"--route-queries {count}: only {len(more)} queries of task {run.task.name!r} are outside "
                         f"the run's splits ({len(taken)} taken). Ask for fewer, or collect with a fixed "
                         "--collect-queries so the rest of the train pool stays free.")
    return [replace(template, query_id=e.id, query=e.query, label=run.task.gold_text(e), prompt="",
                    prompt_source="route_query", loop=0, correct=False, reward=0.0, prompt_mean_accuracy=0.0,
                    gold_nll=None, label_nll=None, prediction=None, extra={"route_query": True}) for e in more]


def training_data(records: Sequence[Record], loop: int, conditioning: str,
                  d0_floor: float, *, route_without_steering: bool = False,
                  route_without_leaning: bool = False, route_distinct: bool = False,
                  route_queries: Sequence[Record] = ()) -> tuple[list[Record], list[float]]:
    """D_loop and each record's conditioning value: D0's records at or above ``d0_floor`` and every later
    loop's kept records up to ``loop``. Query ranks are taken among all of a query's records up to
    ``loop`` (before D0's floor), so a prompt's standing counts every prompt scored on its query.
    ``label_route`` also trains on ``route_queries`` (:func:`route_query_records`)."""
    pool = [r for r in records if r.loop <= loop]
    if conditioning == "label_route":  # two imputed examples per query; D0's floor does not apply
        return label_route_data(pool, without_steering=route_without_steering, without_leaning=route_without_leaning,
                                distinct=route_distinct, route_queries=route_queries)
    values = conditioning_values(pool, conditioning)
    kept = [(r, v) for r, v in zip(pool, values, strict=True) if r.loop > 0 or v >= d0_floor]
    return [r for r, _ in kept], [v for _, v in kept]


def _new_pairs(run: Run, examples: Sequence[Example], samples: Sequence[Sequence[str]],
               dataset_keys: set[tuple[str, str]], *, keep_empty: bool = False) -> list[Pair]:
    """Pairs for the sampled prompts, minus (query, prompt) pairs already seen and, unless ``keep_empty`` (prompts
    drawn from the library, where the empty prompt is D0's "no instruction"), empty written ones."""
    pairs: list[Pair] = []
    seen = set(dataset_keys)
    for example, prompts in zip(examples, samples, strict=True):
        for prompt in prompts:
            if (not prompt and not keep_empty) or (example.id, prompt) in seen:
                continue
            seen.add((example.id, prompt))
            pairs.append(Pair(example, prompt, "policy", run.demos(example)))
    return pairs


def mutation_pairs(run: Run, collect_split: Sequence[Example], pairs: Sequence[Pair], scores: Sequence[Score],
                   inducer: Inducer, loops: LoopConfig, loop: int, known: set[str], d0: Sequence[Record]) -> list[Pair]:
    """Pairs of (collect query, a variation of the best prompt scored on it so far) for ``loops.mutations``
    collect queries (a window that moves with the loop, so later loops vary other queries' prompts).

    A query's best prompt is its right sampled prompt with the lowest answer NLL, else its sampled prompt with
    the lowest NLL, else D0's best prompt on average. Variations equal to a known prompt, naming only a label,
    echoing the request or cut off are dropped (:func:`~.induce.mutate`)."""
    if not collect_split:
        return []
    best: dict[str, tuple[tuple[bool, float], str]] = {}
    for pair, score in zip(pairs, scores, strict=True):
        if score.failed or not pair.prompt:
            continue
        nll = score.label_nll if score.label_nll is not None else score.gold_nll
        rank = (bool(score.correct), -(nll if nll is not None else 0.0))
        if pair.example.id not in best or rank > best[pair.example.id][0]:
            best[pair.example.id] = (rank, pair.prompt)
    # D0 records carry their prompt's mean accuracy over D0's queries.
    fallback = max((r for r in d0 if r.prompt), key=lambda r: r.prompt_mean_accuracy, default=None)
    fallback = fallback.prompt if fallback else ""
    count = min(loops.mutations, len(collect_split))
    start = (loop - 2) * count % len(collect_split)
    chosen = [collect_split[(start + i) % len(collect_split)] for i in range(count)]
    originals = [best[e.id][1] if e.id in best else fallback for e in chosen]
    keep = [i for i, p in enumerate(originals) if p]
    candidates = mutate(run.task, [originals[i] for i in keep], inducer, seed=loops.seed + loop,
                        existing=sorted(known), special_strings=getattr(inducer, "special_strings", ()))
    out = []
    for index, candidate in zip(keep, candidates, strict=True):
        if candidate.reason is None:
            example = chosen[index]
            out.append(Pair(example, candidate.text, candidate.source.rsplit(":", 1)[0], run.demos(example)))
    logger.info("loop %d: %d of %d variations kept", loop, len(out), len(candidates))
    return out


def shrunk_accuracy(pairs: Sequence[Pair], scores: Sequence[Score], *, prior_mean: float,
                    prior_weight: float) -> dict[str, float]:
    """Each prompt's mean accuracy, shrunk towards ``prior_mean`` by ``prior_weight`` pseudo-queries.

    A sampled prompt is usually scored on a single query, where its raw mean
    accuracy is 0 or 1; D0's pool prompts are averaged over every train query.
    Shrinking keeps the two on one reward scale, so a reward token means the same
    for pool and policy prompts: ``(hits + w * prior) / (n + w)``.
    """
    hits: dict[str, list[bool]] = {}
    for pair, score in zip(pairs, scores, strict=True):
        if not score.failed:
            hits.setdefault(pair.prompt, []).append(bool(score.correct))
    return {p: (sum(h) + prior_weight * prior_mean) / (len(h) + prior_weight) for p, h in hits.items()}


def _later(train: TrainConfig, loops: LoopConfig) -> TrainConfig:
    values = asdict(train)
    values["epochs"] = loops.later_epochs
    if loops.later_learning_rate:
        values["learning_rate"] = loops.later_learning_rate
    return TrainConfig(**values)


def fixed_buckets(paths: RunPaths, d0: Sequence[Record], n: int, conditioning: str = "absolute") -> RewardBuckets:
    """The run's reward buckets: read from ``policy/buckets.json``, or placed on D0 and written there.

    Fixed at loop 1, so a reward token means the same in every loop (and in every later fine-tune of the run).
    """
    path = paths.buckets
    if path.is_file():
        buckets = RewardBuckets.from_dict(json.loads(path.read_text()))
        if buckets.num_buckets != n:
            raise ValueError(f"{path} has {buckets.num_buckets} reward buckets but {n} were asked; keep "
                             "--num-buckets as in the first `qpo train` of this run, or use a new run directory.")
        if buckets.conditioning != conditioning:
            raise ValueError(f"{path} was made with --conditioning {buckets.conditioning} but {conditioning} was "
                             f"asked; keep --conditioning {buckets.conditioning} for this run, or use a new run "
                             "directory (a copy of its run.json and dataset.jsonl trains afresh).")
        return buckets
    buckets = RewardBuckets.for_records(d0, n, conditioning)
    atomic_write_json(path, buckets.to_dict())
    return buckets
