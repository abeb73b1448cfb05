"""The QPO policy after each loop, as the benchmark runs it.

* :class:`OnnxPolicy` — the loop's checkpoint exported to a bundle (:func:`loop_bundle`, reused
  while the checkpoint is unchanged) and run through the torch-free runtime one query at a time:
  the product path, with latency. Greedy prompts are :func:`~qpo_middleware.training.evaluate.qpo_prompts`,
  the ``qpo`` method of ``qpo eval``.
* :class:`TorchPolicy` — the checkpoint itself with transformers, batched on a GPU when there is
  one, through the training side's decoder (:func:`~qpo_middleware.training.sampling.generate_prompts`):
  no export and no latency, for full-size runs where ONNX Runtime has no GPU provider.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from qpo_middleware import PromptOptimizer
from qpo_middleware.training.evaluate import qpo_prompts
from qpo_middleware.training.io import atomic_write_json
from qpo_middleware.training.loops import completed_loops
from qpo_middleware.training.run import RunPaths

from .config import BenchmarkConfig

SOURCE_SUFFIX = ".source.json"  # beside a benchmark bundle: the checkpoint it was exported from


def _weights_fingerprint(checkpoint: Path) -> list[list[Any]]:
    return [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in sorted(checkpoint.glob("*.safetensors"))
            + sorted(checkpoint.glob("*.bin"))]


def loop_bundle(run_dir: Path, loop: int, quantize: str | None, *,
                step: Callable[[str], None] | None = None) -> tuple[Path, bool, float]:
    """The bundle of loop ``loop``'s checkpoint: (path, reused, export seconds).

    Reused when the benchmark's bundle of the loop (``RunPaths.bench_bundle``) or, for the final loop,
    the run's bundle (``RunPaths.bundle``) was exported from a checkpoint with the same
    ``training_data_sha256`` and the asked dtype; the benchmark's own bundles must also match the
    checkpoint's weight files (size and mtime, in ``loop_<t>.source.json``).
    """
    from qpo_middleware.training.export import export_bundle, read_policy_meta

    paths = RunPaths(run_dir)
    checkpoint = paths.checkpoint(loop)
    data_sha256 = read_policy_meta(checkpoint).training_data_sha256
    dtype = "int8" if quantize else "fp32"
    out = paths.bench_bundle(loop)
    source = out.with_name(out.name + SOURCE_SUFFIX)
    fingerprint = {"training_data_sha256": data_sha256, "dtype": dtype, "weights": _weights_fingerprint(checkpoint)}

    def matches(bundle: Path) -> bool:
        try:
            manifest = json.loads((bundle / "qpo.json").read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return False
        return manifest.get("training_data_sha256") == data_sha256 and manifest.get("model", {}).get("dtype") == dtype

    if matches(out) and source.is_file() and json.loads(source.read_text(encoding="utf-8")) == fingerprint:
        return out, True, 0.0
    done = completed_loops(run_dir)
    if done and done[-1].loop == loop and matches(paths.bundle):
        return paths.bundle, True, 0.0
    started = time.perf_counter()
    # The benchmark measures the prompts the policy writes (greedy, and sampled for best-of-n), whatever the recipe.
    export_bundle(checkpoint, out, quantize=quantize, overwrite=True, on_step=step, generation={"strategy": "generate"})
    atomic_write_json(source, fingerprint)
    return out, False, time.perf_counter() - started


class OnnxPolicy:
    """A loop's bundle through the torch-free runtime, one query at a time: the product path."""

    def __init__(self, optimizer: PromptOptimizer, config: BenchmarkConfig) -> None:
        self.optimizer, self.config = optimizer, config
        self.label = f"{optimizer.manifest.model.dtype} runtime"

    def greedy(self, queries: Sequence[str]) -> tuple[list[str], list[float] | None]:
        written = qpo_prompts(self.optimizer, queries)
        return written.prompts, written.latencies

    def sample(self, queries: Sequence[str], n: int) -> tuple[list[list[str]], list[float] | None]:
        """``n`` sampled prompts per query (the benchmark's sampling settings, not the bundle's), with the
        milliseconds each query's ``n`` took."""
        config, optimizer = self.config, self.optimizer
        generation = optimizer.manifest.generation.with_(
            top_k=config.sample_top_k, top_p=config.sample_top_p, temperature=config.sample_temperature)
        # The same loaded model and session, with other generation defaults.
        sampler = PromptOptimizer(replace(optimizer.manifest, generation=generation), optimizer.session,
                                  optimizer.tokenizer, config=optimizer.config)
        samples, latencies = [], []
        for index, query in enumerate(queries):
            tick = time.perf_counter()
            outputs = sampler.optimize_batch([query] * n, do_sample=True, seed=config.seed * 1_000_003 + index)
            latencies.append((time.perf_counter() - tick) * 1000.0)
            samples.append([o.prompt for o in outputs])
        return samples, latencies


class TorchPolicy:
    """A loop's checkpoint run with transformers, in batches, on a GPU when there is one (``provider``
    cpu forces the CPU). No export and no latency."""

    def __init__(self, checkpoint: Path, config: BenchmarkConfig) -> None:
        import torch

        from qpo_middleware.training.export import read_policy_meta
        from qpo_middleware.training.models import load_model_and_tokenizer

        self.config = config
        self.format = read_policy_meta(checkpoint).policy
        self.model, self.tokenizer = load_model_and_tokenizer(checkpoint)
        device = "cuda" if config.provider != "cpu" and torch.cuda.is_available() else "cpu"
        self.model.to(device)
        self.label = f"torch on {device}, batched"

    def greedy(self, queries: Sequence[str]) -> tuple[list[str], list[float] | None]:
        from qpo_middleware.bundle import GenerationConfig
        from qpo_middleware.training.sampling import generate_prompts

        rows = generate_prompts(self.model, self.tokenizer, self.format, queries, GenerationConfig.for_policy(self.format),
                                batch_size=self.config.policy_batch_size)
        return [row[0] for row in rows], None

    def sample(self, queries: Sequence[str], n: int) -> tuple[list[list[str]], list[float] | None]:
        from qpo_middleware.bundle import GenerationConfig
        from qpo_middleware.training.sampling import generate_prompts

        config = self.config
        generation = GenerationConfig.for_policy(self.format, do_sample=True, top_k=config.sample_top_k,
                                                 top_p=config.sample_top_p, temperature=config.sample_temperature)
        return generate_prompts(self.model, self.tokenizer, self.format, queries, generation, num_samples=n,
                                seed=config.seed, batch_size=max(1, config.policy_batch_size // n)), None


def open_policy(run_dir: Path, loop: int, config: BenchmarkConfig,
                say: Callable[[str], None]) -> tuple[OnnxPolicy | TorchPolicy, dict[str, Any] | None]:
    """Loop ``loop``'s policy with the configured backend, and the record of its bundle (``None`` with torch)."""
    if config.policy_backend == "torch":
        return TorchPolicy(RunPaths(run_dir).checkpoint(loop), config), None
    say(f"qpo loop {loop}: bundle")
    bundle, reused, export_seconds = loop_bundle(run_dir, loop, config.quantize, step=lambda m: say(f"  {m}"))
    policy = OnnxPolicy(PromptOptimizer.from_bundle(bundle, provider=config.provider), config)  # type: ignore[arg-type]
    manifest = policy.optimizer.manifest
    return policy, {"path": str(bundle), "reused": reused, "export_seconds": export_seconds,
                    "dtype": manifest.model.dtype, "training_data_sha256": manifest.training_data_sha256}
