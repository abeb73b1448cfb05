"""Real-model smoke of the whole path, for both recipes: SmolLM2 scores real SST-2 pairs, a few policy training
steps, Optimum export, and the torch-free runtime serves what torch computes. The paper's recipe (supervised, the
policy writes prompts): the runtime writes the same greedy prompts as torch, also through the benchmark's two
policy backends. The default recipe (DPO, the policy ranks D0's prompts): loop 2 samples among the library, the
exported bundle chooses by default, and picks the prompt torch's scores minus the recorded offsets rank first."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytestmark = pytest.mark.real


def collected(path: Path, data: Path, shared: Any) -> Any:
    """D0 of 6 real SST-2 queries x 4 prompts (3 of the pool + none), scored by the shared SmolLM2; the target."""
    from qpo_middleware.training.collect import collect
    from qpo_middleware.training.config import CollectConfig
    from qpo_middleware.training.hf_target import HFTarget
    from qpo_middleware.training.run import RunPaths
    from qpo_middleware.training.targets import ScoreCache

    config = CollectConfig(task="sst2", queries=6, collect_queries=3, test_queries=3, prompts="3", chunk_size=8,
                           data_dir=str(data))
    target = HFTarget(cache=ScoreCache(RunPaths(path).scores))
    target._lm, target._tok = shared._lm, shared._tok  # share the loaded weights
    summary = collect(config, path, target=target)
    assert summary.dataset_records == 6 * 4
    return target


def test_smollm2_collect_train_export_rewrite(tmp_path: Path, real_data: Path, smollm2_target) -> None:  # noqa: ANN001
    from qpo_middleware import PromptOptimizer
    from qpo_middleware.bundle import GenerationConfig
    from qpo_middleware.training.config import RECIPES, LoopConfig, TrainConfig
    from qpo_middleware.training.dataset import OfflineDataset
    from qpo_middleware.training.export import export_bundle
    from qpo_middleware.training.loops import final_checkpoint, load_policy, run_loops
    from qpo_middleware.training.run import RunPaths
    from qpo_middleware.training.sampling import generate_prompts

    target = collected(tmp_path, real_data, smollm2_target)
    train = TrainConfig(epochs=1, max_steps=2, batch_size=4, trainable="top:2", prompt_max_tokens=12,
                        learning_rate=1e-4, **RECIPES["paper"].train)
    metrics = run_loops(tmp_path, train, LoopConfig(loops=1, eval_greedy=False, **RECIPES["paper"].loops), target=target)
    rewards = sorted(r.reward for r in OfflineDataset(tmp_path).records)
    assert metrics[0].train_records == sum(r >= rewards[round(0.5 * 23)] for r in rewards) < 24  # D0's better half
    assert metrics[0].last_loss > 0

    checkpoint = final_checkpoint(tmp_path)
    bundle = export_bundle(checkpoint, RunPaths(tmp_path).bundle)
    optimizer = PromptOptimizer.from_bundle(bundle, provider="cpu")
    queries = ["a gorgeous , witty , seductive movie .", "the plot is nothing but boilerplate clichés"]
    runtime = [r.prompt for r in optimizer.optimize_batch(queries)]

    model, tokenizer, fmt = load_policy(checkpoint, train)
    torch_prompts = [p[0] for p in generate_prompts(model, tokenizer, fmt, queries, GenerationConfig.for_policy(fmt))]
    assert runtime == torch_prompts
    for query, result in zip(queries, optimizer.optimize_batch(queries), strict=True):
        assert query in result.text

    # The benchmark's torch backend (full-size GPU runs) scores what the runtime path scores.
    from qpo_bench import BenchmarkConfig, benchmark

    common = {"oracle": False, "quantize": None, "bootstrap_samples": 100}
    through_runtime = benchmark(tmp_path, BenchmarkConfig(**common), target=target)
    assert through_runtime.bundles["loop_1"]["reused"]  # RUN/bundle, exported above
    with_torch = benchmark(tmp_path, BenchmarkConfig(**common, policy_backend="torch"), target=target)
    assert with_torch.per_query["prompts"]["qpo_loop1"] == through_runtime.per_query["prompts"]["qpo_loop1"]
    assert with_torch.method("qpo_loop1").accuracy == through_runtime.method("qpo_loop1").accuracy


def test_smollm2_default_recipe_trains_by_dpo_and_the_bundle_chooses(tmp_path: Path, real_data: Path,
                                                                     smollm2_target) -> None:  # noqa: ANN001
    from qpo_middleware import PromptOptimizer
    from qpo_middleware.training.config import RECIPES, LoopConfig, TrainConfig
    from qpo_middleware.training.export import export_bundle, read_choice_offsets, run_prompt_library
    from qpo_middleware.training.loops import final_checkpoint, load_policy, run_loops
    from qpo_middleware.training.preference import candidate_logps

    target = collected(tmp_path, real_data, smollm2_target)
    recipe = RECIPES["default"]  # what `qpo train --recipe default` sets, at a test's size
    train = TrainConfig(**{**recipe.train, "epochs": 1, "max_steps": 2, "batch_size": 4, "trainable": "top:2",
                           "prompt_max_tokens": 12})
    loops = LoopConfig(**{**recipe.loops, "choice_offset_queries": 3})
    assert (train.conditioning, loops.preference, loops.loops) == ("query_rank", "instead", 1)
    metrics = run_loops(tmp_path, train, loops, target=target)
    assert metrics[0].preference_pairs > 0 and metrics[0].train_records == 0  # DPO instead of imitation
    # The loop scores on the collect split the prompts its bundle will serve: the library prompts 'choose' picks.
    assert metrics[0].policy_strategy == "choose" and metrics[0].greedy_accuracy_collect is not None
    assert metrics[0].target_calls == 3  # one per collect query, each a D0 prompt on a query D0 never scored
    assert metrics[0].preference_first_loss is not None
    assert abs(metrics[0].preference_first_loss - np.log(2)) < 1e-3  # the reference is the starting policy

    # Loop 2 (resumed): the policy ranks, so it draws 2 distinct library prompts per collect query by its 'choose'
    # scores; every scored pair is kept, wrong ones too, and DPO trains again on D0 and them.
    from dataclasses import replace

    from qpo_middleware.training.dataset import OfflineDataset

    metrics = run_loops(tmp_path, train, replace(loops, loops=2, samples_per_query=2), target=target)
    second, records = metrics[1], OfflineDataset(tmp_path).records
    new = [r for r in records if r.loop == 2]
    assert second.sampling == "library" and second.sampled_pairs == second.kept_pairs == len(new) == 3 * 2
    assert {r.prompt for r in new} <= {r.prompt for r in records if r.loop == 0} and second.new_distinct_prompts == 0
    assert all(len({r.prompt for r in new if r.query_id == q}) == 2 for q in {r.query_id for r in new})
    assert second.preference_pairs >= metrics[0].preference_pairs and second.policy_strategy == "choose"

    checkpoint = final_checkpoint(tmp_path)
    library = run_prompt_library(checkpoint)
    offsets = read_choice_offsets(checkpoint)
    assert offsets is not None and sorted(offsets.offsets) == sorted(library) and len(library) == 4
    bundle = export_bundle(checkpoint, tmp_path / "bundle")  # no strategy asked: the recipe's, 'choose'
    optimizer = PromptOptimizer.from_bundle(bundle, provider="cpu")
    assert optimizer.info()["strategy"] == "choose"

    queries = ["a gorgeous , witty , seductive movie .", "the plot is nothing but boilerplate clichés"]
    model, tokenizer, fmt = load_policy(checkpoint, train)
    texts = sorted(library)
    expected = candidate_logps(model, tokenizer, fmt, queries, texts, (fmt.top_bucket,))[0].numpy()
    shift = np.array([offsets.offsets[t] for t in texts])
    for query, row, result in zip(queries, expected, optimizer.optimize_batch(queries), strict=True):
        assert result.prompt == texts[int(np.argmax(row - shift))]
        assert query in result.text

    # qpo eval's leakage check on the real run: the bundle chooses D0's prompts, so D0 judges every one it sends,
    # and its shares are those of the prompts it sent (recomputed here from D0's own answers).
    from qpo_middleware.training.dataset import steering_prompts
    from qpo_middleware.training.evaluate import evaluate
    from qpo_middleware.training.run import Run
    from qpo_middleware.training.tasks import LEAN_REACH, names_one_label

    result = evaluate(tmp_path, bundle, methods=("best_pool", "qpo"), target=target)
    qpo = result.method("qpo")
    sent = [sample["prompt"] for sample in result.examples]
    assert len(sent) == result.queries == 3 and qpo.steering_checked_share == 1.0
    steering = steering_prompts(OfflineDataset(tmp_path).loop(0))
    assert qpo.steered_share == pytest.approx(np.mean([p in steering for p in sent]))
    leaning = steering_prompts(OfflineDataset(tmp_path).loop(0), LEAN_REACH)
    assert set(steering) <= set(leaning) and qpo.leaning_share == pytest.approx(np.mean([p in leaning for p in sent]))
    labels = Run.open(tmp_path).task.labels
    assert qpo.label_leak_share == pytest.approx(np.mean([names_one_label(p, labels) for p in sent]))
    if qpo.steered_share == 0.0:
        assert qpo.accuracy_without_steering == pytest.approx(qpo.accuracy)
    assert result.method("best_pool").steered_share is None


def test_smollm2_label_route_bundle_sends_by_its_route_table(tmp_path: Path, real_data: Path,
                                                             smollm2_target) -> None:  # noqa: ANN001
    """A label_route policy on real SST-2 verdicts: training writes the table of the routes it trained on, with the
    route read measured on the held-out collect queries (rule remap), export carries it, and the bundle scores the
    routes as torch does and sends the prompt the table picks from them."""
    from dataclasses import replace

    from qpo_middleware import PromptOptimizer
    from qpo_middleware.training.config import LoopConfig, TrainConfig
    from qpo_middleware.training.dataset import OfflineDataset
    from qpo_middleware.training.export import export_bundle, read_route_table
    from qpo_middleware.training.loops import final_checkpoint, load_policy, run_loops
    from qpo_middleware.training.policy import route_table
    from qpo_middleware.training.preference import candidate_logps
    from qpo_middleware.training.run import Run

    collected(tmp_path, real_data, smollm2_target)
    train = TrainConfig(epochs=1, max_steps=2, batch_size=4, trainable="top:2", prompt_max_tokens=12,
                        conditioning="label_route", route_read_queries=10)
    metrics = run_loops(tmp_path, train, LoopConfig(loops=1, eval_greedy=False, d0_floor_quantile=0.0,
                                                    preference="off"))
    checkpoint = final_checkpoint(tmp_path)
    table = read_route_table(checkpoint)
    assert replace(table, read=None) == route_table(OfflineDataset(tmp_path).loop(0))
    assert sorted(table.labels) == ["negative", "positive"] and len(table.prompts) == 4

    bundle = export_bundle(checkpoint, tmp_path / "bundle")  # no strategy asked: a route table chooses
    optimizer = PromptOptimizer.from_bundle(bundle, provider="cpu")
    assert optimizer.info()["strategy"] == "choose" and optimizer.info()["routes"]["routes"] == len(table.routes)
    assert optimizer.info()["routes"]["rule"] == "remap" and optimizer.info()["routes"]["read"] == table.read
    queries = ["a gorgeous , witty , seductive movie .", "the plot is nothing but boilerplate clichés",
               "it 's a movie , with actors ."]
    model, tokenizer, fmt = load_policy(checkpoint, train)
    # The read: the share of the run's 3 collect queries (all there are, fewer than asked) whose top route is
    # their gold label's.
    run = Run.open(tmp_path)
    held_out = run.splits.collect
    top = candidate_logps(model, tokenizer, fmt, [e.query for e in held_out], list(table.routes),
                          (fmt.top_bucket,))[0].numpy().argmax(-1)
    own = [next(r for r, group in enumerate(table.route_labels) if table.labels.index(run.task.gold_text(e)) in group)
           for e in held_out]
    assert len(held_out) == 3 and table.read == metrics[0].route_read == sum(map(int.__eq__, top.tolist(), own)) / 3
    scores = candidate_logps(model, tokenizer, fmt, queries, list(table.routes), (fmt.top_bucket,))[0].numpy()
    expected = [table.prompts[i] for i in table.pick(scores)]
    for query, want, result in zip(queries, expected, optimizer.optimize_batch(queries), strict=True):
        assert result.prompt == want.strip() and query in result.text
