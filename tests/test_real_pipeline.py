"""Real-model smoke of the whole path: SmolLM2 scores real SST-2 pairs, a few policy training steps,
Optimum export, and the torch-free runtime writes the same greedy prompts as torch (also through the
benchmark's two policy backends)."""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = pytest.mark.real


def test_smollm2_collect_train_export_rewrite(tmp_path: Path, real_data: Path, smollm2_target) -> None:  # noqa: ANN001
    from qpo_middleware import PromptOptimizer
    from qpo_middleware.bundle import GenerationConfig
    from qpo_middleware.training.collect import collect
    from qpo_middleware.training.config import CollectConfig, LoopConfig, TrainConfig
    from qpo_middleware.training.dataset import OfflineDataset
    from qpo_middleware.training.export import export_bundle
    from qpo_middleware.training.hf_target import HFTarget
    from qpo_middleware.training.loops import final_checkpoint, load_policy, run_loops
    from qpo_middleware.training.run import RunPaths
    from qpo_middleware.training.sampling import generate_prompts
    from qpo_middleware.training.targets import ScoreCache

    config = CollectConfig(task="sst2", queries=6, collect_queries=3, test_queries=3, prompts="3", chunk_size=8,
                           data_dir=str(real_data))
    target = HFTarget(cache=ScoreCache(RunPaths(tmp_path).scores))
    target._lm, target._tok = smollm2_target._lm, smollm2_target._tok  # share the loaded weights
    summary = collect(config, tmp_path, target=target)
    assert summary.dataset_records == 6 * 4

    train = TrainConfig(epochs=1, max_steps=2, batch_size=4, trainable="top:2", prompt_max_tokens=12,
                        learning_rate=1e-4)
    metrics = run_loops(tmp_path, train, LoopConfig(loops=1, eval_greedy=False), target=target)
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
