"""Load test of ``qpo serve`` (issue 17): concurrent streaming chat requests through the proxy.

Usage::

    python benchmarks/proxy_load.py --bundle BUNDLE --out benchmarks/results/proxy-load-cpu

Starts the echo upstream (``tests/_echo_upstream.py``: it streams back the request it received) and
``qpo serve`` in front of it, each as its own process on 127.0.0.1. Each round sends ``--concurrency``
streaming requests at once, each with its own id in the query, three ways:

* ``direct``: straight to the upstream (the baseline);
* ``skip``: through the proxy with ``x-qpo-skip: 1`` (the proxy's own overhead, no policy);
* ``rewrite``: through the proxy, every query rewritten by the policy (micro-batched).

Per way and round: errors, replies matched to their own request (the id comes back in what the
upstream received), p50/p95 latency to the last chunk and to the first, and the added latency over
``direct`` at the same percentile; the proxy's RSS after each round. Writes ``OUT/results.json`` and
``OUT/proxy_load.png``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


async def one(client: Any, url: str, index: int, round_: int, headers: dict[str, str]) -> dict[str, Any]:
    tag = f"req-{round_}-{index}"
    body = {"model": "echo", "stream": True,
            "messages": [{"role": "user", "content": f"Is this film any good? ({tag}) It was long but worth it."}]}
    start = time.perf_counter()
    first, text = None, []
    try:
        async with client.stream("POST", url + "/chat/completions", json=body, headers=headers) as response:
            if response.status_code != 200:
                return {"ok": False, "error": f"HTTP {response.status_code}"}
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                delta = json.loads(line[6:])["choices"][0]["delta"].get("content")
                if delta:
                    first = first if first is not None else time.perf_counter()
                    text.append(delta)
    except Exception as exc:  # counted, not raised: a load test reports errors
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    end = time.perf_counter()
    try:
        received = json.loads("".join(text))["body"]["messages"][-1]["content"]
    except (ValueError, KeyError, IndexError):
        return {"ok": False, "error": "unparseable reply"}
    return {"ok": True, "matched": f"({tag})" in received, "ms": (end - start) * 1000.0,
            "first_ms": ((first or end) - start) * 1000.0}


async def round_of(url: str, concurrency: int, round_: int, headers: dict[str, str]) -> dict[str, Any]:
    import httpx

    from qpo_middleware.stats import percentiles

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        start = time.perf_counter()
        results = await asyncio.gather(*(one(client, url, i, round_, headers) for i in range(concurrency)))
        seconds = time.perf_counter() - start
    ok = [r for r in results if r["ok"]]
    errors = [r["error"] for r in results if not r["ok"]]
    return {"requests": concurrency, "errors": len(errors), "error_examples": sorted(set(errors))[:5],
            "matched": sum(r["matched"] for r in ok), "seconds": seconds,
            "latency_ms": percentiles([r["ms"] for r in ok]) if ok else None,
            "first_chunk_ms": percentiles([r["first_ms"] for r in ok]) if ok else None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "proxy-load-cpu")
    parser.add_argument("--concurrency", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--note", default="")
    args = parser.parse_args(argv)
    from _servers import qpo_serve, upstream

    logs = args.out / "work"  # the servers' logs (git-ignored)
    logs.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
        "commit": subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip(),
        "hardware": {"machine": platform.machine(), "processor": platform.processor(), "cpus": os.cpu_count(),
                     "python": platform.python_version()},
        "bundle": str(args.bundle), "concurrency": args.concurrency, "note": args.note, "rounds": []}
    echo_context, echo_url = upstream("_echo_upstream.py", logs / "echo.log")
    with echo_context:
        proxy_context, proxy_url = qpo_serve(args.bundle, echo_url, logs / "proxy.log",
                                             "--max-in-flight", str(4 * args.concurrency))
        with proxy_context as proxy:
            results["proxy_rss_start_mb"] = rss_mb(proxy.pid)
            for round_ in range(args.rounds):
                row: dict[str, Any] = {"round": round_}
                for way, url, headers in (("direct", echo_url, {}), ("skip", proxy_url, {"x-qpo-skip": "1"}),
                                          ("rewrite", proxy_url, {})):
                    row[way] = asyncio.run(round_of(url, args.concurrency, round_, headers))
                    print(f"round {round_} {way}: {row[way]['errors']} errors, {row[way]['matched']} matched, "
                          f"p50 {row[way]['latency_ms']['p50']:.0f} ms", flush=True)
                for way in ("skip", "rewrite"):
                    row[f"{way}_added_ms"] = {p: row[way]["latency_ms"][p] - row["direct"]["latency_ms"][p]
                                              for p in ("p50", "p95")}
                row["proxy_rss_mb"] = rss_mb(proxy.pid)
                results["rounds"].append(row)
            results["proxy_metrics"] = [line for line in __import__("httpx").get(
                proxy_url.removesuffix("/v1") + "/metrics").text.splitlines() if line.startswith("qpo_proxy_")]
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    write_plot(results, args.out)
    return 0


def write_plot(results: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    rounds = [r["round"] for r in results["rounds"]]
    for way in ("direct", "skip", "rewrite"):
        axes[0].plot(rounds, [r[way]["latency_ms"]["p50"] for r in results["rounds"]], "o-", label=f"{way} p50")
        axes[0].plot(rounds, [r[way]["latency_ms"]["p95"] for r in results["rounds"]], "x--", label=f"{way} p95")
    axes[0].set_title(f"{results['concurrency']} concurrent streams: latency to the last chunk (ms)")
    axes[0].set_xlabel("round")
    axes[0].legend(fontsize=7)
    axes[1].plot(rounds, [r["proxy_rss_mb"] for r in results["rounds"]], "o-")
    axes[1].set_title("proxy RSS after each round (MB)")
    axes[1].set_xlabel("round")
    fig.tight_layout()
    fig.savefig(out / "proxy_load.png", dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
