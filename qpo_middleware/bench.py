"""Runtime measurements shared by ``qpo bench`` and ``benchmarks/latency.py`` (torch-free).

Every decode here is greedy with a fixed length: the end-of-prompt tokens are suppressed
and ``new_tokens`` are generated for every row, so per-token times compare like for like
between engines and runs. Latencies are wall-clock milliseconds; percentiles are over
single rewrites.
"""

from __future__ import annotations

import os
import resource
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from .bundle import GenerationConfig
from .config import RuntimeConfig
from .runtime import PromptOptimizer
from .stats import percentiles


def peak_rss_mb() -> float:
    """This process's peak resident set size so far, in MB.

    Linux: VmHWM from /proc (ru_maxrss would carry the parent's peak across fork + exec);
    elsewhere ru_maxrss (KB on Linux, bytes on macOS).
    """
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def current_rss_mb() -> float:
    """This process's resident set size now, in MB (Linux /proc; falls back to the peak)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as handle:
            pages = int(handle.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / (1024 * 1024)
    except (OSError, ValueError):
        return peak_rss_mb()


def memory_bandwidth_gbs(size_mb: int = 256, repeats: int = 5, threads: int | None = None) -> dict[str, float]:
    """Measured read bandwidth in GB/s: the best of ``repeats`` sums over a ``size_mb`` array.

    Summed with one thread and with ``threads`` threads (default: the CPUs this process may
    use), each over its own slice (numpy releases the GIL in reductions); the higher is the
    machine's usable bandwidth for a decode that uses every core.
    """
    if threads is None:
        threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    data = np.ones(size_mb * 1024 * 1024 // 8, dtype=np.float64)
    data.sum()  # fault the pages in

    def best(run: Callable[[], None]) -> float:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
        return data.nbytes / min(times) / 1e9

    single = best(lambda: data.sum())
    slices = np.array_split(data, threads)

    def parallel() -> None:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            list(pool.map(np.sum, slices))

    multi = best(parallel) if threads > 1 else single
    return {"single_thread_gbs": single, "all_threads_gbs": multi, "threads": float(threads),
            "gbs": max(single, multi)}


def fixed_length_generation(optimizer: PromptOptimizer, new_tokens: int) -> GenerationConfig:
    """Greedy, ``new_tokens`` per row, EOS never chosen; decode with ``eos_token_ids=()`` so no row stops early."""
    generation = optimizer.generation(do_sample=False)
    return generation.with_(
        max_new_tokens=new_tokens,
        suppress_token_ids=tuple(sorted({*generation.suppress_token_ids, *optimizer.policy.eos_token_ids})),
    )


def fixed_length_ids(optimizer: PromptOptimizer, rows: Sequence[Sequence[int]], new_tokens: int) -> list[list[int]]:
    """Exactly ``new_tokens`` greedy ids per row of policy inputs (the benchmarks' fixed-length decode)."""
    return optimizer.generate_ids(rows, generation=fixed_length_generation(optimizer, new_tokens), eos_token_ids=())


Decode = Callable[[Sequence[Sequence[int]], int], list[list[int]]]
"""``decode(rows, new_tokens)``: greedy, fixed-length ids for a batch of policy inputs (any engine)."""


def measure_decode(
    decode: Decode,
    rows: Sequence[Sequence[int]],
    *,
    new_tokens: int = 32,
    batch_sizes: Sequence[int] = (1, 8, 32, 64),
    latency_queries: int = 20,
    warmup: int = 2,
) -> dict[str, Any]:
    """Batch-1 latency percentiles, per-token time, and throughput per batch size, on policy inputs ``rows``.

    The same measurement for every engine: ``decode`` is the only engine-specific part.
    """

    def timed(batch: Sequence[Sequence[int]], tokens: int) -> tuple[float, list[list[int]]]:
        start = time.perf_counter()
        ids = decode(batch, tokens)
        return (time.perf_counter() - start) * 1000.0, ids

    for row in rows[:warmup]:
        timed([row], new_tokens)
    sample = [rows[i % len(rows)] for i in range(latency_queries)]
    prefill = [timed([row], 1)[0] for row in sample]
    latencies, outputs = [], []
    for row in sample:
        ms, ids = timed([row], new_tokens)
        latencies.append(ms)
        outputs.append(ids[0])
    per_token = (float(np.median(latencies)) - float(np.median(prefill))) / max(new_tokens - 1, 1)
    throughput = {}
    for size in batch_sizes:
        count = max(size, 16)
        batch_rows = [rows[i % len(rows)] for i in range(count)]
        timed(batch_rows[:size], new_tokens)  # warm this shape
        start = time.perf_counter()
        for lo in range(0, count, size):
            decode(batch_rows[lo : lo + size], new_tokens)
        seconds = time.perf_counter() - start
        throughput[str(size)] = {"queries": count, "rewrites_per_s": count / seconds,
                                 "tokens_per_s": count * new_tokens / seconds}
    return {
        "new_tokens": new_tokens,
        "latency_ms": percentiles(latencies),
        "prefill_ms": percentiles(prefill),
        "per_token_ms": per_token,
        "throughput": throughput,
        "outputs": outputs,
    }


def measure_runtime(optimizer: PromptOptimizer, rows: Sequence[Sequence[int]], **kwargs: Any) -> dict[str, Any]:
    """:func:`measure_decode` with the runtime's own decode loop (``kwargs`` as there)."""

    def decode(batch: Sequence[Sequence[int]], tokens: int) -> list[list[int]]:
        return fixed_length_ids(optimizer, batch, tokens)

    return measure_decode(decode, rows, **kwargs)


def measure_concurrency(
    optimizer: PromptOptimizer, queries: Sequence[str], callers: int, calls_per_caller: int = 2
) -> dict[str, Any]:
    """``callers`` threads each call ``optimize`` ``calls_per_caller`` times (bundle's own generation
    settings, so rows stop at EOS): rewrites/s and per-call latency percentiles."""
    barrier = threading.Barrier(callers)
    latencies: list[float] = []
    lock = threading.Lock()

    def caller(index: int) -> None:
        barrier.wait()
        for j in range(calls_per_caller):
            query = queries[(index * calls_per_caller + j) % len(queries)]
            start = time.perf_counter()
            optimizer.optimize(query)
            with lock:
                latencies.append((time.perf_counter() - start) * 1000.0)

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=callers) as pool:
        list(pool.map(caller, range(callers)))
    seconds = time.perf_counter() - start
    return {"callers": callers, "calls": len(latencies), "rewrites_per_s": len(latencies) / seconds,
            "latency_ms": percentiles(latencies), **optimizer.stats()}


def measure_concurrency_modes(
    bundle: str | os.PathLike[str], config: RuntimeConfig, queries: Sequence[str], callers: int
) -> list[dict[str, Any]]:
    """:func:`measure_concurrency` without and with micro-batching (2 ms window, batches of ``callers``)."""
    out = []
    for window in (None, 2.0):
        served_config = config.with_(batch_window_ms=window, max_batch_size=callers)
        with PromptOptimizer.from_bundle(bundle, config=served_config) as served:
            row = measure_concurrency(served, queries, callers)
        row["micro_batching"] = window is not None
        out.append(row)
    return out
