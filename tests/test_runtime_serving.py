"""Serving features of the runtime: RuntimeConfig, IO binding, LRU cache, latency budget,
micro-batching, asyncio, provider selection and fallback (tiny exported bundle)."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import onnxruntime as ort
import pytest
from _tiny import QUERIES

from qpo_middleware import LatencyBudgetExceeded, PromptOptimizer, RuntimeConfig
from qpo_middleware.batching import BatcherClosedError, MicroBatcher, QueueFullError
from qpo_middleware.config import RuntimeConfigError
from qpo_middleware.decoder import make_session

MANY = list(QUERIES) + [f"{q} (variant {i})" for i in range(7) for q in QUERIES]


@pytest.fixture(scope="module")
def reference(bundle: Path) -> dict[str, str]:
    """Greedy prompts decoded one query at a time, plain settings: what every serving path must return."""
    optimizer = PromptOptimizer.from_bundle(bundle, provider="cpu")
    return {q: optimizer.optimize(q).prompt for q in MANY}


def test_config_validation_names_the_field() -> None:
    with pytest.raises(RuntimeConfigError, match="graph_optimization"):
        RuntimeConfig(graph_optimization="max")  # type: ignore[arg-type]
    with pytest.raises(RuntimeConfigError, match="max_batch_size must be an integer >= 1"):
        RuntimeConfig(max_batch_size=0)
    with pytest.raises(RuntimeConfigError, match="latency_budget_ms"):
        RuntimeConfig(latency_budget_ms=-1)
    with pytest.raises(RuntimeConfigError, match="provider"):
        RuntimeConfig(provider="tpu")  # type: ignore[arg-type]
    with pytest.raises(RuntimeConfigError, match="no field"):
        RuntimeConfig().with_(threads=2)
    assert RuntimeConfig().with_(provider=None, cache_size=3).cache_size == 3


def test_session_settings_reach_onnxruntime(bundle: Path) -> None:
    config = RuntimeConfig(provider="cpu", intra_op_threads=1, graph_optimization="basic")
    optimizer = PromptOptimizer.from_bundle(bundle, config=config)
    options = optimizer.session.get_session_options()
    assert options.intra_op_num_threads == 1
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    assert optimizer.config.provider == "cpu" and optimizer.provider == "CPUExecutionProvider"
    # Keyword overrides win over the config.
    assert PromptOptimizer.from_bundle(bundle, config=config, max_batch_size=3).max_batch_size == 3


@pytest.mark.parametrize("graph_optimization", ["disable", "all"])
def test_io_binding_and_graph_levels_give_the_same_greedy_prompts(
    bundle: Path, reference: dict[str, str], graph_optimization: str
) -> None:
    config = RuntimeConfig(provider="cpu", io_binding=True, graph_optimization=graph_optimization,  # type: ignore[arg-type]
                           max_batch_size=5)
    optimizer = PromptOptimizer.from_bundle(bundle, config=config)
    assert optimizer.decoder.io_binding
    # Batches of 5 with rows stopping at different steps: the bound KV cache is cut to the live rows.
    results = optimizer.optimize_batch(MANY)
    assert [r.prompt for r in results] == [reference[q] for q in MANY]
    assert len({r.tokens for r in results}) > 1


def test_lru_cache(bundle: Path, reference: dict[str, str]) -> None:
    optimizer = PromptOptimizer.from_bundle(bundle, config=RuntimeConfig(provider="cpu", cache_size=2))
    first = optimizer.optimize(QUERIES[1])
    again = optimizer.optimize(QUERIES[1])
    assert first.status == "rewritten" and again.status == "cached"
    assert again.prompt == first.prompt == reference[QUERIES[1]]
    assert again.text == first.text
    optimizer.optimize(QUERIES[2])
    optimizer.optimize(QUERIES[3])  # evicts QUERIES[1] (least recently used)
    assert optimizer.optimize(QUERIES[1]).status == "rewritten"
    stats = optimizer.stats()
    assert stats["cache_size"] == 2 and stats["cache_hits"] == 1
    # Sampled prompts are never cached.
    sampled = [optimizer.optimize(QUERIES[2], do_sample=True, seed=s).status for s in range(2)]
    assert sampled == ["rewritten", "rewritten"]


def test_latency_budget_fails_open(bundle: Path) -> None:
    optimizer = PromptOptimizer.from_bundle(bundle, config=RuntimeConfig(provider="cpu", latency_budget_ms=0))
    results = optimizer.optimize_batch(QUERIES[:3])
    for query, result in zip(QUERIES[:3], results, strict=True):
        assert result.status == "timeout" and result.prompt == ""
        assert result.text == optimizer.template.render("", query).text
        assert query in result.text
    # A call-level budget overrides the config's.
    assert optimizer.optimize(QUERIES[0], latency_budget_ms=60_000).status == "rewritten"


def test_latency_budget_can_raise(bundle: Path) -> None:
    config = RuntimeConfig(provider="cpu", latency_budget_ms=0, fail_open=False)
    optimizer = PromptOptimizer.from_bundle(bundle, config=config)
    with pytest.raises(LatencyBudgetExceeded, match="latency budget"):
        optimizer.optimize(QUERIES[0])


def test_decode_stops_at_the_deadline(bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An overrunning decode is stopped between steps, not left running."""
    from qpo_middleware import runtime

    optimizer = PromptOptimizer.from_bundle(bundle, provider="cpu")
    rows = [optimizer.input_ids(q) for q in QUERIES]
    steps = 0
    original = optimizer.decoder.forward

    def counting(*args, **kwargs):
        nonlocal steps
        steps += 1
        return original(*args, **kwargs)

    optimizer.decoder.forward = counting  # type: ignore[method-assign]
    # The clock passes the deadline once the second model run (the first decode step) is done.
    monkeypatch.setattr(runtime, "_clock", lambda: 100.0 if steps >= 2 else 0.0)
    with pytest.raises(LatencyBudgetExceeded):
        optimizer.generate_ids(rows, deadline=50.0)
    assert steps == 2  # prefill + one step, then the deadline check stopped it


def test_micro_batching_from_many_threads(bundle: Path, reference: dict[str, str]) -> None:
    config = RuntimeConfig(provider="cpu", batch_window_ms=5, max_batch_size=8)
    with PromptOptimizer.from_bundle(bundle, config=config) as optimizer:
        barrier = threading.Barrier(16)

        def call(query: str) -> str:
            barrier.wait()  # all 16 calls arrive together
            return optimizer.optimize(query).prompt

        with ThreadPoolExecutor(max_workers=16) as pool:
            got = list(pool.map(call, MANY[:16]))
        assert got == [reference[q] for q in MANY[:16]]
        stats = optimizer.stats()
        assert stats["batched_queries"] == 16
        assert stats["batches"] < 16  # queries from different threads shared decodes


def test_asyncio_callers_get_their_own_prompts(bundle: Path, reference: dict[str, str]) -> None:
    config = RuntimeConfig(provider="cpu", batch_window_ms=2, max_batch_size=16)
    with PromptOptimizer.from_bundle(bundle, config=config) as optimizer:

        async def main() -> list[str]:
            results = await asyncio.gather(*(optimizer.aoptimize(q) for q in MANY))
            return [r.prompt for r in results]

        assert asyncio.run(main()) == [reference[q] for q in MANY]


def test_micro_batcher_queue_bound_and_close() -> None:
    release = threading.Event()
    started = threading.Event()

    def slow(queries: list[str]) -> list[str]:
        started.set()
        release.wait(5)
        return [q.upper() for q in queries]

    batcher: MicroBatcher[str] = MicroBatcher(slow, window_ms=0, max_batch_size=1, max_queue=1)
    first = batcher.submit("a")
    assert started.wait(5)  # the worker holds "a"
    second = batcher.submit("b")  # waits in the queue (1 slot)
    with pytest.raises(QueueFullError, match="max_queue"):
        batcher.submit("c")
    release.set()
    assert first.result(5) == "A" and second.result(5) == "B"
    batcher.close()
    with pytest.raises(BatcherClosedError):
        batcher.submit("d")


def test_micro_batcher_passes_errors_to_every_waiter() -> None:
    def broken(queries: list[str]) -> list[str]:
        raise ValueError("decode failed")

    batcher: MicroBatcher[str] = MicroBatcher(broken, window_ms=20, max_batch_size=4, max_queue=8)
    futures = [batcher.submit(q) for q in "abc"]
    for future in futures:
        with pytest.raises(ValueError, match="decode failed"):
            future.result(5)
    batcher.close()


def test_overloaded_queue_fails_open(bundle: Path) -> None:
    config = RuntimeConfig(provider="cpu", batch_window_ms=0, max_batch_size=1, max_queue=1)
    optimizer = PromptOptimizer.from_bundle(bundle, config=config)
    release, decoding = threading.Event(), threading.Event()
    original = optimizer._decode_queries

    def held(*args, **kwargs):
        decoding.set()
        release.wait(10)
        return original(*args, **kwargs)

    optimizer._batcher._run_batch = held  # type: ignore[union-attr]
    with ThreadPoolExecutor(max_workers=2) as pool:
        busy = [pool.submit(optimizer.optimize, QUERIES[0])]
        assert decoding.wait(10)  # the worker holds the first query
        busy.append(pool.submit(optimizer.optimize, QUERIES[1]))
        deadline = time.monotonic() + 10
        while optimizer.stats()["queue"] < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        overloaded = optimizer.optimize(QUERIES[2])  # the one queue slot is taken
        release.set()
        assert [f.result(20).status for f in busy] == ["rewritten", "rewritten"]
    assert overloaded.status == "overloaded" and overloaded.prompt == ""
    assert QUERIES[2] in overloaded.text
    optimizer.close()


def test_provider_auto_falls_back_to_cpu_and_says_so(
    bundle: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    with caplog.at_level(logging.INFO, logger="qpo_middleware.runtime"):
        optimizer = PromptOptimizer.from_bundle(bundle)
    assert optimizer.provider == "CPUExecutionProvider"
    assert any("no CUDAExecutionProvider" in r.getMessage() for r in caplog.records)
    with pytest.raises(RuntimeError, match=r"pip install 'qpo-middleware\[gpu\]'"):
        PromptOptimizer.from_bundle(bundle, provider="cuda")


def test_cuda_that_does_not_start_is_logged(
    bundle: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """onnxruntime-gpu lists CUDA but cannot start it (no driver): ORT runs on CPU; we warn."""
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    real = ort.InferenceSession

    def cpu_only(path, sess_options=None, providers=None):
        assert providers and providers[0] == "CUDAExecutionProvider"
        return real(path, sess_options=sess_options, providers=["CPUExecutionProvider"])

    monkeypatch.setattr(ort, "InferenceSession", cpu_only)
    with caplog.at_level(logging.WARNING, logger="qpo_middleware.runtime"):
        session = make_session(Path(bundle) / "model.onnx", RuntimeConfig(provider="auto"))
    assert session.get_providers()[0] == "CPUExecutionProvider"
    assert any("did not start" in r.getMessage() for r in caplog.records)


def test_fixed_length_decode_and_measurements(bundle: Path) -> None:
    from qpo_middleware.bench import fixed_length_ids, measure_runtime
    from qpo_middleware.stats import percentiles

    optimizer = PromptOptimizer.from_bundle(bundle, provider="cpu")
    rows = [optimizer.input_ids(q) for q in QUERIES]
    ids = fixed_length_ids(optimizer, rows, 6)
    # Every row decodes exactly 6 tokens and never an EOS (QUERIES[0] stops early with the bundle's settings).
    assert all(len(row) == 6 for row in ids)
    assert not any(t in optimizer.policy.eos_token_ids for row in ids for t in row)
    result = measure_runtime(optimizer, rows, new_tokens=6, batch_sizes=(1, 2), latency_queries=3, warmup=1)
    assert result["latency_ms"]["n"] == 3 and result["per_token_ms"] > 0
    assert set(result["throughput"]) == {"1", "2"}
    assert len(result["outputs"]) == 3 and all(len(o) == 6 for o in result["outputs"])
    stats = percentiles([1.0, 2.0, 3.0, 4.0])
    assert stats["p50"] == 2.5 and stats["min"] == 1.0 and 3.9 < stats["p99"] <= 4.0


def test_cli_bench(bundle: Path, tmp_path: Path) -> None:
    import json

    from typer.testing import CliRunner

    from qpo_middleware.cli import app

    out = tmp_path / "bench.json"
    result = CliRunner().invoke(app, ["bench", str(bundle), "--provider", "cpu", "--new-tokens", "4",
                                      "--batch-sizes", "1,2", "--concurrency", "2", "--latency-queries", "2",
                                      "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "per-token time" in result.output and "concurrent callers" in result.output
    data = json.loads(out.read_text())
    assert data["dtype"] == "fp32" and data["latency_ms"]["n"] == 2
    assert [c["micro_batching"] for c in data["concurrency"]] == [False, True]
    bad = CliRunner().invoke(app, ["bench", str(tmp_path / "missing")])
    assert bad.exit_code == 2 and "error" in bad.output


def test_onnxruntime_is_a_choice_with_a_clear_error(monkeypatch: pytest.MonkeyPatch,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    import importlib.metadata
    import sys

    from qpo_middleware import _onnxruntime

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if neither package were installed
    with pytest.raises(ImportError, match=r"qpo-middleware\[cpu\].*qpo-middleware\[gpu\]"):
        _onnxruntime.import_onnxruntime()
    monkeypatch.undo()

    real = importlib.metadata.distribution
    monkeypatch.setattr(importlib.metadata, "distribution",
                        lambda name: object() if name in ("onnxruntime", "onnxruntime-gpu") else real(name))
    assert _onnxruntime.installed_distributions() == ["onnxruntime", "onnxruntime-gpu"]
    with caplog.at_level(logging.WARNING, logger="qpo_middleware.runtime"):
        _onnxruntime.import_onnxruntime()
    assert any("pip uninstall -y onnxruntime onnxruntime-gpu" in r.getMessage() for r in caplog.records)


def test_the_package_declares_onnxruntime_only_as_extras() -> None:
    import tomllib

    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    assert not any(d.startswith("onnxruntime") for d in project["dependencies"])
    extras = project["optional-dependencies"]
    assert extras["cpu"] == ["onnxruntime>=1.20"] and extras["gpu"] == ["onnxruntime-gpu>=1.20"]
    # No other extra drags a second ONNX Runtime in (optimum-onnx without its onnxruntime extra).
    for name, requirements in extras.items():
        if name not in ("cpu", "gpu"):
            assert not any("onnxruntime" in r.split(">")[0].split("<")[0] for r in requirements), name


def test_with_qpo_concurrent_ainvoke_shares_decodes(bundle: Path, reference: dict[str, str]) -> None:
    """Many concurrent ainvoke calls through with_qpo: each reply carries its own query and prompt."""
    from _langchain_helpers import EchoChatModel

    from qpo_middleware.integrations.langchain import with_qpo

    calls = [MANY[i % len(MANY)] for i in range(120)]
    config = RuntimeConfig(provider="cpu", batch_window_ms=2, max_batch_size=32)
    with PromptOptimizer.from_bundle(bundle, config=config) as optimizer:
        chain = with_qpo(EchoChatModel(), optimizer)

        async def main() -> list[str]:
            replies = await asyncio.gather(*(chain.ainvoke(q) for q in calls))
            return [str(r.content) for r in replies]

        replies = asyncio.run(main())
        for query, reply in zip(calls, replies, strict=True):
            expected = optimizer.template.render(reference[query], query).text
            assert reply == f"human: {expected}"  # its own query, verbatim, after its own prompt
        stats = optimizer.stats()
        assert stats["batched_queries"] == len(calls) and stats["batches"] < len(calls) / 4


def test_rewriter_reports_the_optimizers_own_timeout(bundle: Path) -> None:
    """An optimizer budget without fail-open is a timeout for the rewriter (which then fails open)."""
    from qpo_middleware.integrations.langchain import QPORewriter

    config = RuntimeConfig(provider="cpu", latency_budget_ms=0, fail_open=False)
    for batching in (None, 1.0):
        optimizer = PromptOptimizer.from_bundle(bundle, config=config.with_(batch_window_ms=batching))
        rewriter = QPORewriter(optimizer=optimizer)
        assert rewriter.invoke(QUERIES[0]) == QUERIES[0]
        assert asyncio.run(rewriter.ainvoke(QUERIES[1])) == QUERIES[1]
        assert rewriter.stats["timeout"] == 2 and rewriter.stats["passed_through"] == 2
        optimizer.close()
