"""``qpo bench``: measure a bundle on this machine with the torch-free runtime."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from ._common import console, user_errors

_DEFAULT_QUERIES = [
    "The film was a delight from start to finish.",
    "A tedious, overlong mess with nothing to say.",
    "What is the capital of the country that hosted the 2016 Summer Olympics?",
    "Stocks rallied on Tuesday after the central bank held interest rates steady.",
    "I can't believe how badly the delivery went, three weeks late and broken.",
    "Natalia sold clips to 48 of her friends in April, and then half as many in May. How many in all?",
    "An unexpectedly moving portrait of a family coming apart.",
    "The new phone's battery lasts two days, but the camera is disappointing.",
]


def command(
    bundle: Annotated[Path, typer.Argument(help="Bundle directory made by `qpo export`.")],
    provider: Annotated[str, typer.Option(help="'auto', 'cpu' or 'cuda'.")] = "auto",
    threads: Annotated[int, typer.Option(help="ONNX Runtime intra-op threads (0 = one per physical core).")] = 0,
    new_tokens: Annotated[int, typer.Option(help="Tokens decoded per rewrite (fixed length, EOS suppressed).")] = 32,
    batch_sizes: Annotated[str, typer.Option(help="Comma-separated batch sizes for throughput.")] = "1,8,32,64",
    concurrency: Annotated[str, typer.Option(help="Comma-separated numbers of concurrent callers ('' = skip).")] = "8",
    latency_queries: Annotated[int, typer.Option(help="Single rewrites timed for the latency percentiles.")] = 20,
    queries_file: Annotated[Path | None, typer.Option(help="A text file with one query per line (default: built-in examples).")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the results to this JSON file.")] = None,
) -> None:
    """Latency (p50/p95/p99), per-token time, throughput per batch size, concurrency, load time and RSS."""
    with user_errors():
        from qpo_middleware.bench import (
            current_rss_mb,
            measure_concurrency_modes,
            measure_runtime,
            memory_bandwidth_gbs,
            peak_rss_mb,
        )
        from qpo_middleware.config import RuntimeConfig
        from qpo_middleware.runtime import PromptOptimizer

        queries = _DEFAULT_QUERIES
        if queries_file is not None:
            queries = [line.strip() for line in queries_file.read_text(encoding="utf-8").splitlines() if line.strip()]
            if not queries:
                raise ValueError(f"{queries_file} has no non-empty line; put one query per line.")
        sizes = [int(s) for s in batch_sizes.split(",") if s.strip()]
        callers = [int(s) for s in concurrency.split(",") if s.strip()]
        config = RuntimeConfig(provider=provider, intra_op_threads=threads)  # type: ignore[arg-type]
        start = time.perf_counter()
        optimizer = PromptOptimizer.from_bundle(bundle, config=config)
        load_s = time.perf_counter() - start
        rss_loaded = current_rss_mb()
        rows = [optimizer.input_ids(q) for q in queries]
        with console.status("decoding..."):
            result = measure_runtime(optimizer, rows, new_tokens=new_tokens, batch_sizes=sizes,
                                     latency_queries=latency_queries)
            result.pop("outputs")
            result["concurrency"] = [row for n in callers
                                     for row in measure_concurrency_modes(bundle, config, queries, n)]
            bandwidth = memory_bandwidth_gbs()
        result.update(bundle=str(bundle), dtype=optimizer.manifest.model.dtype, provider=optimizer.provider,
                      load_s=load_s, rss_after_load_mb=rss_loaded, peak_rss_mb=peak_rss_mb(),
                      memory_bandwidth=bandwidth)

    table = Table(title=f"{bundle} ({result['dtype']}) on {result['provider']}")
    table.add_column("measure")
    table.add_column("value", justify="right")
    lat = result["latency_ms"]
    table.add_row(f"rewrite latency, batch 1, {new_tokens} tokens",
                  f"p50 {lat['p50']:.1f} / p95 {lat['p95']:.1f} / p99 {lat['p99']:.1f} ms")
    table.add_row("per-token time", f"{result['per_token_ms']:.2f} ms")
    table.add_row("prefill + first token (p50)", f"{result['prefill_ms']['p50']:.1f} ms")
    for size, row in result["throughput"].items():
        table.add_row(f"throughput, batch {size}", f"{row['rewrites_per_s']:.1f} rewrites/s")
    for row in result["concurrency"]:
        mode = "micro-batching" if row["micro_batching"] else "one decode per call"
        table.add_row(f"{row['callers']} concurrent callers, {mode}",
                      f"{row['rewrites_per_s']:.1f} rewrites/s, p95 {row['latency_ms']['p95']:.0f} ms")
    table.add_row("load time", f"{load_s:.2f} s")
    table.add_row("RSS after load / peak", f"{rss_loaded:.0f} / {result['peak_rss_mb']:.0f} MB")
    table.add_row("memory read bandwidth", f"{bandwidth['gbs']:.1f} GB/s")
    console.print(table)
    if json_out is not None:
        json_out.write_text(json.dumps(result, indent=1))
        console.print(f"results: {json_out}")
