"""Core path B end to end on tiny models: collect -> 2 loops -> export -> torch-free rewrite."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _handmade import handmade_d0, small_run

from qpo_middleware.training.collect import collect
from qpo_middleware.training.config import CollectConfig, LoopConfig, TrainConfig, TrainConfigError
from qpo_middleware.training.dataset import OfflineDataset
from qpo_middleware.training.loops import completed_loops, final_checkpoint, route_query_records, run_loops
from qpo_middleware.training.run import Run, RunPaths


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny random Llama with the SmolLM2 tokenizer: policy base and target."""
    from _tiny_policy import save_tiny_checkpoint

    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


def configs(model: str) -> tuple[TrainConfig, LoopConfig]:
    train = TrainConfig(epochs=2, batch_size=8, learning_rate=5e-3, num_buckets=4, prompt_max_tokens=8,
                        query_max_tokens=16, warmup_ratio=0.0, conditioning="absolute")
    # The loops' own mechanics (sampling, scoring, merging, resuming) with the paper's supervised step: a policy
    # trained by DPO alone ranks prompts, it does not write them (tests/test_quality_levers.py covers that recipe).
    loops = LoopConfig(loops=2, base_model=model, samples_per_query=2, reward_floor_quantile=0.0, top_k=50,
                       d0_floor_quantile=0.0, preference="off")
    return train, loops


def test_two_loops_export_and_rewrite(tmp_path: Path, tiny_base: str) -> None:
    from qpo_middleware import PromptOptimizer
    from qpo_middleware.training.export import export_bundle

    small_run(tmp_path, tiny_base)
    train, loops = configs(tiny_base)
    metrics = run_loops(tmp_path, train, loops)
    assert [m.loop for m in metrics] == [1, 2]
    assert metrics[0].train_records == 8 * 5  # D0: 8 queries x (4 pool prompts + empty)
    assert 0 < metrics[1].kept_pairs <= metrics[1].sampled_pairs
    records = OfflineDataset(tmp_path).records
    d0_min = min(r.reward for r in records if r.loop == 0)
    assert metrics[1].reward_floor == d0_min  # quantile 0 of D0
    assert all(r.reward >= d0_min for r in records if r.loop == 2)
    assert {r.loop for r in records} == {0, 2}
    assert len([r for r in records if r.loop == 2]) == metrics[1].kept_pairs
    assert all(r.prompt_source == "policy" for r in records if r.loop == 2)
    assert metrics[1].train_records == len(records)
    pool = {r.prompt for r in records if r.loop == 0}
    new = {r.prompt for r in records if r.loop == 2} - pool
    assert metrics[1].new_distinct_prompts_kept == len(new) <= metrics[1].new_distinct_prompts
    assert metrics[1].new_distinct_prompts > 0 and 0.0 <= metrics[1].new_prompt_accuracy <= 1.0  # random text: new
    for m in metrics:
        assert m.greedy_accuracy_collect is not None and 0.0 <= m.greedy_accuracy_collect <= 1.0
    paths = RunPaths(tmp_path)
    saved = json.loads(paths.metrics(2).read_text())
    assert saved["kept_pairs"] == metrics[1].kept_pairs
    assert metrics[1].checkpoint == str(paths.checkpoint(2)) and final_checkpoint(tmp_path) == paths.checkpoint(2)
    assert paths.buckets.is_file() and (paths.checkpoint(1) / "model.safetensors").is_file()

    from qpo_middleware.training.export import read_choice_offsets

    assert read_choice_offsets(paths.checkpoint(2)) is None  # no preference step: 'choose' scores by likelihood
    bundle = export_bundle(final_checkpoint(tmp_path), paths.bundle)
    optimizer = PromptOptimizer.from_bundle(bundle)
    query = "a gorgeous , witty , seductive movie ."
    result = optimizer.optimize(query)
    assert query in result.text and result.latency_ms > 0
    # The bundle carries the run's prompt library: every distinct non-blank prompt of D0 and loop 2, with its
    # record count, tokenized as the policy was trained to write it (read back through the runtime).
    from collections import Counter

    from qpo_middleware.library import read_library

    library = read_library(bundle / "library.json", vocab_size=optimizer.manifest.model.vocab_size, max_ids=9)
    counts = Counter(r.prompt for r in records)
    assert {e.text: e.count for e in library} == counts and len(counts) == len(pool | new)
    assert any(e.ids == (optimizer.policy.eos_token_ids[0],) for e in library)  # D0's "no instruction" prompt
    tokenizer = optimizer.tokenizer
    for entry in library:
        assert entry.ids == (*tokenizer.encode(entry.text, add_special_tokens=False).ids[:8], optimizer.policy.eos_token_ids[0])
    assert optimizer.info()["library"]["prompts"] == len(library) and optimizer.drafter is not None
    plain = PromptOptimizer.from_bundle(bundle, config=optimizer.config.with_(speculative=False))
    queries = [r.query for r in records][:12]
    assert [r.prompt for r in optimizer.optimize_batch(queries)] == [r.prompt for r in plain.optimize_batch(queries)]
    assert plain.stats()["draft_tokens"] == 0  # (this barely trained policy's prompts may never meet a draft)
    # An earlier loop's checkpoint gets the prompts known at that loop only.
    from qpo_middleware.training.export import run_prompt_library

    assert run_prompt_library(paths.checkpoint(1)) == Counter(r.prompt for r in records if r.loop <= 1)


def test_loops_resume_at_the_first_unfinished_loop(tmp_path: Path, tiny_base: str) -> None:
    small_run(tmp_path, tiny_base)
    train, loops = configs(tiny_base)
    run_loops(tmp_path, train, LoopConfig(**{**loops.__dict__, "loops": 1}))
    assert [m.loop for m in completed_loops(tmp_path)] == [1]
    calls: list[str] = []
    metrics = run_loops(tmp_path, train, loops, on_phase=lambda loop, name: calls.append(f"{loop}:{name}"))
    assert [m.loop for m in metrics] == [1, 2]
    assert calls and all(c.startswith("2:") for c in calls)  # loop 1 was not redone
    # Re-running a finished run does nothing.
    assert run_loops(tmp_path, train, loops, on_phase=lambda *a: pytest.fail("no work expected")) == metrics


def test_d0_floor_trains_on_the_better_part_of_d0_only(tmp_path: Path, tiny_base: str) -> None:
    small_run(tmp_path, tiny_base)
    train, loops = configs(tiny_base)
    metrics = run_loops(tmp_path, train, LoopConfig(**{**loops.__dict__, "loops": 1, "d0_floor_quantile": 0.5}))
    rewards = sorted(r.reward for r in OfflineDataset(tmp_path).records)
    floor = rewards[round(0.5 * (len(rewards) - 1))]
    assert metrics[0].train_records == sum(r >= floor for r in rewards) < len(rewards)
    with pytest.raises(ValueError, match="d0_floor_quantile"):
        LoopConfig(d0_floor_quantile=1.0)


def test_query_rank_conditioning_trains_on_the_better_half_of_each_query_and_stays_fixed(
        tmp_path: Path, tiny_base: str) -> None:
    from qpo_middleware.training.policy import RewardBuckets, conditioning_values

    small_run(tmp_path, tiny_base)
    train, loops = configs(tiny_base)
    ranked = TrainConfig(**{**train.__dict__, "conditioning": "query_rank"})
    metrics = run_loops(tmp_path, ranked, LoopConfig(**{**loops.__dict__, "loops": 1, "d0_floor_quantile": 0.5}))
    d0 = OfflineDataset(tmp_path).records
    values = sorted(conditioning_values(d0, "query_rank"))
    floor = values[round(0.5 * (len(values) - 1))]
    assert metrics[0].train_records == sum(v >= floor for v in values) < len(d0)
    buckets = RewardBuckets.from_dict(json.loads(RunPaths(tmp_path).buckets.read_text()))
    assert buckets == RewardBuckets.even(4)
    # The run's buckets are fixed: a resume with the paper's conditioning is refused with the fix named.
    with pytest.raises(ValueError, match="keep --conditioning query_rank"):
        run_loops(tmp_path, train, loops)
    with pytest.raises(ValueError, match="conditioning"):
        TrainConfig(conditioning="rank")


def test_label_rank_conditioning_runs_two_loops_and_stays_fixed(
        tmp_path: Path, tiny_base: str) -> None:
    from qpo_middleware.training.policy import RewardBuckets

    small_run(tmp_path, tiny_base)
    train, loops = configs(tiny_base)
    by_label = TrainConfig(**{**train.__dict__, "conditioning": "label_rank"})
    metrics = run_loops(tmp_path, by_label, loops)
    assert [m.loop for m in metrics] == [1, 2]
    records = OfflineDataset(tmp_path).records
    assert metrics[1].train_records == len(records) and all(r.label for r in records)
    assert RewardBuckets.from_dict(json.loads(RunPaths(tmp_path).buckets.read_text())) == RewardBuckets.even(
        4, "label_rank")
    assert {r.loop for r in records} == {0, 2}  # loop 2's policy prompts were ranked and trained on too
    # The run's buckets are fixed: resuming with another conditioning is refused with the fix named.
    with pytest.raises(ValueError, match="keep --conditioning label_rank"):
        run_loops(tmp_path, TrainConfig(**{**train.__dict__, "conditioning": "query_rank"}),
                  LoopConfig(**{**loops.__dict__, "loops": 3}))


def test_label_route_conditioning_trains_two_imputed_examples_per_query(tmp_path: Path, tiny_base: str) -> None:
    from qpo_middleware.training.policy import RewardBuckets

    small_run(tmp_path, tiny_base)
    train, loops = configs(tiny_base)
    routed = TrainConfig(**{**train.__dict__, "conditioning": "label_route"})
    metrics = run_loops(tmp_path, routed, LoopConfig(**{**loops.__dict__, "loops": 1}))
    records = OfflineDataset(tmp_path).records
    labels = {r.label for r in records}
    assert len(labels) > 1 and all(r.label for r in records)
    # Per query: its label's best prompt (top token) and worst (bottom token); the dataset itself is unchanged.
    assert metrics[0].train_records == 2 * len({r.query_id for r in records})
    assert not any(r.prompt_source.startswith("label_route") for r in records)
    assert RewardBuckets.from_dict(json.loads(RunPaths(tmp_path).buckets.read_text())) == RewardBuckets.even(
        4, "label_route")
    # The checkpoint carries the route table its bundle sends by: the routes it trained on.
    from qpo_middleware.training.export import read_route_table
    from qpo_middleware.training.policy import route_table

    assert read_route_table(RunPaths(tmp_path).checkpoint(1)) == route_table(records)
    assert metrics[0].policy_strategy == "choose"

    # More labelled queries from the train pool (no target call): each gets the same two examples, none is in any
    # split of the run, and asking for more than the pool holds is refused with the fix named.
    small_run(tmp_path / "more", tiny_base)
    run = Run.open(tmp_path / "more")
    more = route_query_records(run, 3, OfflineDataset(tmp_path / "more").loop(0)[0])
    taken = {e.id for split in (run.splits.train, run.splits.collect, run.splits.test) for e in split}
    pool = {e.id: e for e in run.task.splits(seed=run.config.seed, n_train=8, n_collect=6, n_test=4, n_dev=3).dev}
    assert [r.query_id for r in more] == list(pool) and not taken & set(pool)
    assert [(r.query, r.label) for r in more] == [(e.query, run.task.gold_text(e)) for e in pool.values()]
    with_more = TrainConfig(**{**routed.__dict__, "route_queries": 3})
    metrics = run_loops(tmp_path / "more", with_more, LoopConfig(**{**loops.__dict__, "loops": 1}))
    assert metrics[0].train_records == 2 * (len({r.query_id for r in records}) + 3)
    assert len(OfflineDataset(tmp_path / "more")) == len(records)  # nothing was scored on them
    with pytest.raises(ValueError, match="route-queries 100000: .*ask for fewer"):
        route_query_records(run, 100_000, more[0])
    with pytest.raises(TrainConfigError, match="route_queries only applies to --conditioning label_route"):
        TrainConfig(route_queries=3)
    with pytest.raises(TrainConfigError, match="route_read_queries only applies to --conditioning label_route"):
        TrainConfig(route_read_queries=3)
    with pytest.raises(TrainConfigError, match="route_read_queries must be an integer >= 0"):
        TrainConfig(conditioning="label_route", route_read_queries=-1)

    # With route_read_queries the table carries the read (rule remap): the share of the first 4 collect queries
    # (of 6) whose top route under the trained policy is their gold label's; nothing else in it changes.
    from dataclasses import replace

    from qpo_middleware.training.loops import final_checkpoint, load_policy
    from qpo_middleware.training.preference import candidate_logps

    small_run(tmp_path / "read", tiny_base)
    reads = TrainConfig(**{**routed.__dict__, "route_read_queries": 4})
    metrics = run_loops(tmp_path / "read", reads, LoopConfig(**{**loops.__dict__, "loops": 1}))
    table = read_route_table(final_checkpoint(tmp_path / "read"))
    assert replace(table, read=None) == route_table(OfflineDataset(tmp_path / "read").records)
    run = Run.open(tmp_path / "read")
    held_out = run.splits.collect[:4]
    assert len(run.splits.collect) == 6
    model, tokenizer, fmt = load_policy(final_checkpoint(tmp_path / "read"), reads)
    top = candidate_logps(model, tokenizer, fmt, [e.query for e in held_out], list(table.routes),
                          (fmt.top_bucket,))[0].argmax(-1).tolist()
    own = [next(r for r, group in enumerate(table.route_labels) if table.labels.index(run.task.gold_text(e)) in group)
           for e in held_out]
    assert table.read == metrics[0].route_read == sum(t == o for t, o in zip(top, own, strict=True)) / 4

    # Distinct routes reach training: every label's top route is a different prompt, and the loop trains on them.
    from qpo_middleware.training.loops import training_data
    from qpo_middleware.training.policy import label_routes

    distinct = TrainConfig(**{**routed.__dict__, "route_distinct": True})
    small_run(tmp_path / "distinct", tiny_base)
    metrics = run_loops(tmp_path / "distinct", distinct, LoopConfig(**{**loops.__dict__, "loops": 1}))
    d0 = OfflineDataset(tmp_path / "distinct").records
    tops = [p for (_, value), p in label_routes(d0, distinct=True).items() if value == 1.0]
    assert len(tops) == len({r.label for r in d0}) == len(set(tops))
    examples, _ = training_data(d0, 1, "label_route", 0.0, route_distinct=True)
    assert metrics[0].train_records == len(examples)
    assert {r.prompt for r in examples if r.prompt_source == "label_route:best"} == set(tops)

    # The tiny random target answers one label whatever the prompt: every prompt steers it, so routes without
    # steering prompts leave none, and the run says how to get some.
    plain = TrainConfig(**{**routed.__dict__, "route_without_steering": True})
    small_run(tmp_path / "plain", tiny_base)
    with pytest.raises(ValueError, match="steers the target to one label"):
        run_loops(tmp_path / "plain", plain, LoopConfig(**{**loops.__dict__, "loops": 1}))
    # Every steering prompt leans too: routes without leaning prompts leave none either.
    lean_free = TrainConfig(**{**routed.__dict__, "route_without_leaning": True})
    small_run(tmp_path / "lean_free", tiny_base)
    with pytest.raises(ValueError, match="leans the target to one label.*route_without_leaning"):
        run_loops(tmp_path / "lean_free", lean_free, LoopConfig(**{**loops.__dict__, "loops": 1}))


def test_preference_step_after_or_instead_of_the_supervised_one(tmp_path: Path, tiny_base: str) -> None:
    import math
    from dataclasses import replace

    train, loops = configs(tiny_base)
    for name in ("after", "instead"):
        small_run(tmp_path / name, tiny_base)
        # The tiny random target gives every prompt the same verdict on a query; one more scored prompt with the
        # opposite verdict per query makes the right-vs-wrong contrasts a real target gives.
        dataset = OfflineDataset(tmp_path / name)
        first = {r.query_id: r for r in dataset.loop(0)}
        dataset.append([replace(r, prompt="Decide.", prompt_source="pool:flip", correct=not r.correct)
                        for r in first.values()])
    after = run_loops(tmp_path / "after", train, LoopConfig(**{**loops.__dict__, "loops": 1, "preference": "after"}))
    instead = run_loops(tmp_path / "instead", train,
                        LoopConfig(**{**loops.__dict__, "loops": 1, "preference": "instead"}))
    for m in (after[0], instead[0]):
        assert m.preference_pairs > 0 and m.preference_last_loss is not None
    assert after[0].preference_pairs == instead[0].preference_pairs == 8 * 4  # 8 queries, 4 pairs each
    assert after[0].train_records == 8 * 6 and instead[0].train_records == 0
    # The first DPO step starts from the reference itself (loss log 2): instead of the supervised step, the
    # previous loop's policy; after it, the supervised policy of this loop, not the one before that step.
    assert instead[0].preference_first_loss == pytest.approx(math.log(2), abs=1e-4)
    assert instead[0].first_loss == instead[0].preference_first_loss
    assert after[0].preference_first_loss == pytest.approx(math.log(2), abs=1e-4)
    assert after[0].first_loss != after[0].preference_first_loss  # the supervised step ran first
    assert (RunPaths(tmp_path / "instead").checkpoint(1) / "model.safetensors").is_file()
    with pytest.raises(ValueError, match="preference"):
        LoopConfig(preference="dpo")
    check_choice_offsets(tmp_path / "instead", train, loops)


def check_choice_offsets(run: Path, train: TrainConfig, loops: LoopConfig) -> None:
    """A preference step leaves each library prompt's mean log-probability under its reference (here the base
    policy) in the checkpoint; export carries it into the library, and strategy 'choose' picks by policy - offset."""
    import numpy as np

    from qpo_middleware import PromptOptimizer
    from qpo_middleware.training.export import export_bundle, read_choice_offsets
    from qpo_middleware.training.loops import load_policy
    from qpo_middleware.training.preference import candidate_logps

    checkpoint = RunPaths(run).checkpoint(1)
    recorded = read_choice_offsets(checkpoint)
    records = OfflineDataset(run).records
    prompts = sorted({r.prompt for r in records})
    queries = sorted({r.query_id: r.query for r in records}.items())
    assert recorded is not None and sorted(recorded.offsets) == prompts and recorded.queries == len(queries) == 8
    reference, tokenizer, fmt = load_policy(loops.base_model, train)  # seeded like the step's reference
    ref = candidate_logps(reference, tokenizer, fmt, [q for _, q in queries], prompts, (fmt.top_bucket,))[0]
    assert np.allclose([recorded.offsets[p] for p in prompts], ref.mean(0).numpy(), atol=1e-4)

    optimizer = PromptOptimizer.from_bundle(export_bundle(checkpoint, run / "bundle", generation={"strategy": "choose"}))
    assert optimizer.info()["library"]["offsets"] and optimizer.info()["strategy"] == "choose"
    policy, tokenizer, fmt = load_policy(checkpoint, train)
    scores = candidate_logps(policy, tokenizer, fmt, [q for _, q in queries], prompts, (fmt.top_bucket,))[0].numpy()
    offsets = np.array([recorded.offsets[p] for p in prompts])
    expected = [prompts[int(np.argmax(row - offsets))] for row in scores]
    assert [r.prompt for r in optimizer.optimize_batch([q for _, q in queries])] == expected


def test_loops_need_d0(tmp_path: Path, tiny_base: str) -> None:
    with pytest.raises(FileNotFoundError, match="qpo collect"):
        run_loops(tmp_path, *configs(tiny_base))


def test_new_prompt_accuracy_is_shrunk_to_the_d0_scale() -> None:
    from qpo_middleware.training.loops import shrunk_accuracy
    from qpo_middleware.training.targets import Pair, Score
    from qpo_middleware.training.tasks import Example

    pairs = [Pair(Example("a", "q1", 1), "p"), Pair(Example("b", "q2", 1), "p"), Pair(Example("c", "q3", 1), "r")]
    scores = [Score(correct=True), Score(correct=True), Score(correct=False)]
    accuracy = shrunk_accuracy(pairs, scores, prior_mean=0.5, prior_weight=2.0)
    assert accuracy == {"p": pytest.approx((2 + 1.0) / 4), "r": pytest.approx(1.0 / 3)}
    assert shrunk_accuracy(pairs, scores, prior_mean=0.5, prior_weight=0.0)["r"] == 0.0


def test_dev_split_scores_every_loop_and_chooses_the_kept_one(tmp_path: Path, tiny_base: str) -> None:
    """The dev split is scored after every loop (never sampled on: loop 2 samples on collect queries only),
    and the kept loop is the best there; without a dev split it is the last."""
    from qpo_middleware.training.loops import LoopMetrics, chosen_loop
    from qpo_middleware.training.run import Run

    collect(CollectConfig(task="sst2_sample", target=tiny_base, queries=8, collect_queries=6, test_queries=4,
                          dev_queries=5, prompts="4", chunk_size=8, batch_size=8), tmp_path)
    run = Run.open(tmp_path)
    dev_ids = {e.id for e in run.splits.dev}
    assert len(dev_ids) == 5 and not dev_ids & {e.id for e in (*run.splits.train, *run.splits.collect)}
    train, loops = configs(tiny_base)
    metrics = run_loops(tmp_path, train, loops)
    assert all(m.greedy_accuracy_dev is not None and 0.0 <= m.greedy_accuracy_dev <= 1.0 for m in metrics)
    assert not dev_ids & {r.query_id for r in OfflineDataset(tmp_path).records}  # no record on a dev query
    kept, why = chosen_loop(metrics)
    assert kept.greedy_accuracy_dev == max(m.greedy_accuracy_dev for m in metrics) and "dev" in why

    def loop(n: int, dev: float | None) -> LoopMetrics:
        return LoopMetrics(loop=n, train_records=1, first_loss=0.0, last_loss=0.0, train_seconds=0.0,
                           greedy_accuracy_dev=dev)

    assert chosen_loop([loop(1, 0.7), loop(2, 0.6), loop(3, 0.7)])[0].loop == 1  # earliest on a tie
    assert chosen_loop([loop(1, 0.5), loop(2, 0.6)])[0].loop == 2
    assert chosen_loop([loop(1, None), loop(2, None)])[0].loop == 2
    with pytest.raises(ValueError, match="No loop"):
        chosen_loop([])


def test_later_loops_of_the_default_recipe_sample_among_the_library(tmp_path: Path, tiny_base: str) -> None:
    """A policy trained by DPO alone ranks prompts: loop 2 draws distinct library prompts per collect query by its
    'choose' scores, keeps every scored pair (wrong ones too: they make the next preference pairs) and trains DPO
    again on D0 and the new pairs."""
    from dataclasses import replace

    handmade_d0(tmp_path, tiny_base)
    train, loops = configs(tiny_base)
    dpo = replace(loops, preference="instead", samples_per_query=2, choice_offset_queries=4,
                  reward_floor_quantile=0.9)  # a floor that would drop most pairs of a writing policy
    metrics = run_loops(tmp_path, replace(train, conditioning="query_rank"), dpo)
    assert [m.sampling for m in metrics] == [None, "library"]
    records = OfflineDataset(tmp_path).records
    library = {r.prompt for r in records if r.loop == 0}
    new = [r for r in records if r.loop == 2]
    collect_ids = {e.id for e in Run.open(tmp_path).splits.collect}
    assert metrics[1].sampled_pairs == metrics[1].kept_pairs == len(new) == 6 * 2  # 6 collect queries x 2 distinct
    assert {r.query_id for r in new} == collect_ids and {r.prompt for r in new} <= library and len(library) == 3
    assert all(len({r.prompt for r in new if r.query_id == q}) == 2 for q in collect_ids)
    assert metrics[1].new_distinct_prompts == 0 and metrics[1].train_records == 0
    assert metrics[1].preference_pairs >= metrics[0].preference_pairs and metrics[1].policy_strategy == "choose"
    assert metrics[1].greedy_accuracy_collect is not None


def test_later_loops_need_collect_queries_past_the_skipped_ones(tmp_path: Path, tiny_base: str) -> None:
    small_run(tmp_path, tiny_base)  # 6 collect queries
    train, loops = configs(tiny_base)
    with pytest.raises(ValueError, match=r"no collect query left \(6 collected, 6 skipped\).*--loops 1"):
        run_loops(tmp_path, train, LoopConfig(**{**loops.__dict__, "collect_skip": 6}))
    with pytest.raises(ValueError, match="collect_skip must be >= 0"):
        LoopConfig(collect_skip=-1)
    assert not completed_loops(tmp_path)  # refused before any training


def test_library_samples_follow_the_choice_scores() -> None:
    """Gumbel top-k: k distinct prompts per query, the first drawn as softmax(scores / temperature) says."""
    import numpy as np

    from qpo_middleware.training.loops import library_samples

    library = ["a", "b", "c", "d"]
    scores = np.tile(np.log([0.1, 0.2, 0.3, 0.4]), (4000, 1))
    samples = library_samples(scores, library, 2, 1.0, seed=0)
    assert all(len(set(row)) == 2 for row in samples)
    first = [row[0] for row in samples]
    for text, p in zip(library, (0.1, 0.2, 0.3, 0.4), strict=True):
        assert abs(first.count(text) / len(first) - p) < 0.03, (text, first.count(text))
    assert samples == library_samples(scores, library, 2, 1.0, seed=0)  # seeded
    cold = library_samples(scores, library, 1, 0.01, seed=1)
    assert all(row == ["d"] for row in cold)  # a cold draw is the 'choose' pick
    assert all(sorted(row) == library for row in library_samples(scores[:3], library, 9, 1.0, seed=2))
    with pytest.raises(ValueError, match="4 scores per query for 3 prompts"):
        library_samples(scores, library[:3], 1, 1.0, seed=0)


def test_preference_without_steering_never_prefers_a_prompt_that_answers_one_label(tmp_path: Path,
                                                                                    tiny_base: str) -> None:
    from dataclasses import replace

    from qpo_middleware.training.loops import _preference_data
    from qpo_middleware.training.preference import preference_pairs

    first = handmade_d0(tmp_path, tiny_base)
    positives = sum(str(r.label) == "positive" for r in first.values())
    assert 0 < positives < len(first)
    train, loops = configs(tiny_base)
    plain = LoopConfig(**{**loops.__dict__, "loops": 1, "preference": "instead", "preference_without_steering": True})
    metrics = run_loops(tmp_path, train, plain)
    # Positive queries: (Say positive., Guess.) is dropped, (Decide., Guess.) kept; negative queries keep both of
    # theirs, (Decide., Say positive.) and (Decide., Guess.): "Say positive." stays a rejected prompt.
    assert metrics[0].preference_pairs == positives + 2 * (len(first) - positives)
    # Without the setting every right-vs-wrong pair counts: two per query.
    assert len(preference_pairs(OfflineDataset(tmp_path).loop(0), 4)) == 2 * len(first)
    with pytest.raises(ValueError, match="preference off"):
        LoopConfig(preference="off", preference_without_steering=True)
    # Logs without gold labels cannot say which prompts steer: refused before any model runs, with the fix.
    unlabelled = [replace(r, label=None) for r in OfflineDataset(tmp_path).loop(0)]
    with pytest.raises(ValueError, match="drop --preference-without-steering"):
        _preference_data(None, None, None, unlabelled, 0, plain)
