"""Speculative decoding from the bundle's prompt library against plain greedy decoding (issue 16).

Usage::

    python benchmarks/speculative.py --run RUN --out benchmarks/results/speculative-cpu

``RUN`` is a trained run directory (``qpo collect`` + ``qpo train``); its final loop's policy is
exported (int8 and fp32, each with the run's prompt library) under ``OUT/work/``. In one run, on the
same bundles and the same held-out queries (the run's test split, never trained on):

1. Per bundle, plain and speculative greedy decoding of the bundle's own prompts (natural length,
   rows stop at EOS): batch-1 latency p50/p95 per rewrite, forward passes per rewrite, the share of
   drafted tokens accepted, throughput at batch 8 and 32, and the share of identical prompts
   (must be 1.0). Plain and speculative alternate query by query, so drift hits both alike.
2. The no-gain case: the untrained SmolLM2 policy (its prompts are not library prompts) exported
   int8 with the same library, measured the same way: what drafting costs when it rarely helps.
3. Prefill at batch 64: time and peak RSS with every position's logits (logits_to_keep = 0, what
   every bundle computed before the graph edit) against the last position's only (= 1), each in its
   own process.
4. int4 against int8 and fp32: per-token time of fixed-length decodes and the share of tokens
   equal to fp32's.

Every measurement runs in its own process, one at a time. Writes ``OUT/results.json`` and
``OUT/speculative.png``; prints a summary.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))


# ---------------------------------------------------------------------------- workers (one process each)


def _decode_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Plain and speculative greedy decoding of one bundle on the same queries."""
    from qpo_middleware import PromptOptimizer, RuntimeConfig
    from qpo_middleware.bench import peak_rss_mb
    from qpo_middleware.stats import percentiles

    queries: list[str] = spec["queries"]
    modes = {
        "plain": PromptOptimizer.from_bundle(spec["bundle"], config=RuntimeConfig(provider="cpu", speculative=False)),
        "speculative": PromptOptimizer.from_bundle(spec["bundle"], config=RuntimeConfig(
            provider="cpu", max_draft_tokens=spec["max_draft_tokens"])),
    }
    assert modes["speculative"].drafter is not None, "the bundle has no prompt library"
    for optimizer in modes.values():  # warm both
        optimizer.optimize_batch(queries[:2])
        optimizer.optimize_batch(queries[2:10])
    before = {name: optimizer.stats() for name, optimizer in modes.items()}
    latencies: dict[str, list[float]] = {name: [] for name in modes}
    prompts: dict[str, list[str]] = {name: [] for name in modes}
    tokens: list[int] = []
    for i, query in enumerate(queries):
        order = list(modes) if i % 2 == 0 else list(reversed(modes))
        for name in order:
            start = time.perf_counter()
            result = modes[name].optimize(query)
            latencies[name].append((time.perf_counter() - start) * 1000.0)
            prompts[name].append(result.prompt)
            if name == "plain":
                tokens.append(result.tokens)
    out: dict[str, Any] = {"queries": len(queries), "tokens_per_rewrite": sum(tokens) / len(tokens)}
    for name, optimizer in modes.items():
        stats = optimizer.stats()
        counts = {key: stats[key] - before[name][key] for key in ("forward_passes", "draft_tokens",
                                                                   "accepted_draft_tokens")}
        out[name] = {
            "latency_ms": percentiles(latencies[name]),
            "forward_passes_per_rewrite": counts["forward_passes"] / len(queries),
            "draft_tokens": counts["draft_tokens"],
            "accepted_draft_tokens": counts["accepted_draft_tokens"],
            "acceptance": counts["accepted_draft_tokens"] / counts["draft_tokens"] if counts["draft_tokens"] else None,
        }
    out["identical_share"] = sum(a == b for a, b in zip(prompts["plain"], prompts["speculative"], strict=True)) / len(queries)
    out["p50_ratio"] = out["speculative"]["latency_ms"]["p50"] / out["plain"]["latency_ms"]["p50"]
    out["library_prompt_share"] = sum(p in spec["library_texts"] for p in prompts["plain"]) / len(queries)
    out["throughput"] = {}
    for size in spec["batch_sizes"]:
        row = {}
        for name, optimizer in modes.items():
            optimizer.max_batch_size = size
            start = time.perf_counter()
            batched = optimizer.optimize_batch(queries)
            row[name] = len(queries) / (time.perf_counter() - start)
            row[f"{name}_identical_share"] = sum(r.prompt == p for r, p in zip(batched, prompts["plain"], strict=True)) / len(queries)
        out["throughput"][str(size)] = row
    out["peak_rss_mb"] = peak_rss_mb()
    out["examples"] = [{"query": q, "prompt": p} for q, p in zip(queries[:5], prompts["plain"][:5], strict=True)]
    return out


def _prefill_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """One batch-64 prefill, timed, keeping ``keep`` positions' logits (0 = all); peak RSS of this process."""
    import numpy as np

    from qpo_middleware import PromptOptimizer, RuntimeConfig
    from qpo_middleware.bench import current_rss_mb, peak_rss_mb
    from qpo_middleware.generator import left_pad

    optimizer = PromptOptimizer.from_bundle(spec["bundle"], config=RuntimeConfig(provider="cpu"))
    decoder = optimizer.decoder
    rows = [optimizer.input_ids(q) for q in spec["queries"][:64]]
    ids, mask, positions = left_pad(rows, optimizer.policy.pad_token_id)
    feeds: dict[str, Any] = {"input_ids": ids, "attention_mask": mask, "position_ids": positions,
                             "logits_to_keep": np.array([spec["keep"]], dtype=np.int64)}
    past = decoder.empty_past(len(rows))
    for (key, value), i in zip(decoder.past_names, range(0, len(past), 2), strict=True):
        feeds[key], feeds[value] = past[i], past[i + 1]
    rss_loaded = current_rss_mb()
    times = []
    for _ in range(spec["repeats"]):
        start = time.perf_counter()
        logits = decoder.session.run(["logits"], feeds)[0]
        times.append((time.perf_counter() - start) * 1000.0)
    return {"keep": spec["keep"], "batch": len(rows), "width": int(ids.shape[1]), "logits_shape": list(logits.shape),
            "prefill_ms_min": min(times), "prefill_ms_median": float(np.median(times)),
            "rss_after_load_mb": rss_loaded, "peak_rss_mb": peak_rss_mb()}


def _fixed_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Fixed-length greedy decodes (EOS suppressed) of one bundle: per-token time and the ids."""
    from qpo_middleware import PromptOptimizer, RuntimeConfig
    from qpo_middleware.bench import fixed_length_ids, measure_runtime

    optimizer = PromptOptimizer.from_bundle(spec["bundle"], config=RuntimeConfig(provider="cpu", speculative=False))
    rows = [optimizer.input_ids(q) for q in spec["queries"]]
    timing = measure_runtime(optimizer, rows, new_tokens=spec["new_tokens"], batch_sizes=(8,),
                             latency_queries=spec["latency_queries"])
    ids = [fixed_length_ids(optimizer, [row], spec["new_tokens"])[0] for row in rows]
    return {"per_token_ms": timing["per_token_ms"], "latency_ms": timing["latency_ms"],
            "throughput_8": timing["throughput"]["8"], "ids": ids,
            "model_mb": sum(p.stat().st_size for p in Path(spec["bundle"]).glob("model.onnx*")) / 1e6}


WORKERS = {"decode": _decode_worker, "prefill": _prefill_worker, "fixed": _fixed_worker}


def run_worker(spec: dict[str, Any], work: Path, name: str) -> dict[str, Any]:
    spec_path, out_path = work / f"{name}.spec.json", work / f"{name}.out.json"
    spec_path.write_text(json.dumps(spec))
    subprocess.run([sys.executable, __file__, "--worker", str(spec_path), str(out_path)], check=True)
    return json.loads(out_path.read_text())


# ---------------------------------------------------------------------------- orchestration


def export_once(checkpoint: Path, out: Path, *, library: dict[str, int], quantize: str | None) -> Path:
    from qpo_middleware.training.export import export_bundle

    marker = out.parent / f"{out.name}.source.json"
    source = {"checkpoint": str(checkpoint.resolve()), "quantize": quantize, "library": len(library)}
    if (out / "qpo.json").is_file() and marker.is_file() and json.loads(marker.read_text()) == source:
        return out
    export_bundle(checkpoint, out, quantize=quantize, library=library, overwrite=True)
    marker.write_text(json.dumps(source))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, help="A trained run directory (qpo collect + qpo train).")
    parser.add_argument("--loop", type=int, default=None, help="The loop whose policy to export (default: the last).")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "speculative-cpu")
    parser.add_argument("--queries", type=int, default=200, help="Held-out queries (the run's test split).")
    parser.add_argument("--max-draft-tokens", type=int, default=None,
                        help="Longest draft verified at once (default: RuntimeConfig's).")
    parser.add_argument("--draft-sweep", default="4,8,32",
                        help="Other max_draft_tokens values measured at batch 1 on the int8 bundle.")
    parser.add_argument("--batch-sizes", default="8,32")
    parser.add_argument("--skip", default="", help="Parts to skip: fp32, nogain, prefill, int4.")
    parser.add_argument("--note", default="")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        spec = json.loads(Path(args.worker[0]).read_text())
        Path(args.worker[1]).write_text(json.dumps(WORKERS[spec["kind"]](spec)))
        return 0
    if args.run is None:
        parser.error("--run RUN is required")

    from latency import prepare_policy

    from qpo_middleware.training.export import run_prompt_library
    from qpo_middleware.training.loops import completed_loops
    from qpo_middleware.training.run import Run, RunPaths

    skip = {s for s in args.skip.split(",") if s}
    if args.max_draft_tokens is None:
        from qpo_middleware import RuntimeConfig

        args.max_draft_tokens = RuntimeConfig().max_draft_tokens
    paths = RunPaths(args.run)
    loop = args.loop or completed_loops(args.run)[-1].loop
    checkpoint = paths.checkpoint(loop)
    library = run_prompt_library(checkpoint) or {}
    library_texts = sorted(t for t in library if t.strip())
    queries = [e.query for e in Run.open(args.run).splits.test][: args.queries]
    work = args.out / "work"
    work.mkdir(parents=True, exist_ok=True)
    started = time.time()
    results: dict[str, Any] = {
        "command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
        "commit": subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip(),
        "hardware": {"machine": platform.machine(), "processor": platform.processor(), "cpus": os.cpu_count(),
                     "python": platform.python_version()},
        "note": args.note, "run": str(args.run), "loop": loop, "queries": len(queries),
        "library_prompts": len(library_texts), "max_draft_tokens": args.max_draft_tokens, "bundles": {},
    }

    def save() -> None:
        results["seconds"] = time.time() - started
        (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")

    bundles = {"int8": export_once(checkpoint, work / "bundle-int8", library=library, quantize="int8")}
    if "fp32" not in skip:
        bundles["fp32"] = export_once(checkpoint, work / "bundle-fp32", library=library, quantize=None)
    if "nogain" not in skip:
        untrained = prepare_policy(None, work)
        bundles["untrained-int8"] = export_once(untrained, work / "bundle-untrained-int8", library=library,
                                                quantize="int8")
    batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b]
    for name, bundle in bundles.items():
        print(f"[speculative] decoding with {name} …", flush=True)
        results["bundles"][name] = run_worker(
            {"kind": "decode", "bundle": str(bundle), "queries": queries, "batch_sizes": batch_sizes,
             "max_draft_tokens": args.max_draft_tokens, "library_texts": library_texts}, work, f"decode-{name}")
        save()
    results["draft_sweep"] = {}
    for value in [int(v) for v in args.draft_sweep.split(",") if v]:
        print(f"[speculative] int8 with max_draft_tokens={value} …", flush=True)
        row = run_worker({"kind": "decode", "bundle": str(bundles["int8"]), "queries": queries, "batch_sizes": [],
                          "max_draft_tokens": value, "library_texts": library_texts}, work, f"sweep-{value}")
        results["draft_sweep"][str(value)] = {"p50_ratio": row["p50_ratio"], "identical_share": row["identical_share"],
                                              "plain_p50_ms": row["plain"]["latency_ms"]["p50"],
                                              "speculative_p50_ms": row["speculative"]["latency_ms"]["p50"],
                                              "forward_passes_per_rewrite": row["speculative"]["forward_passes_per_rewrite"],
                                              "acceptance": row["speculative"]["acceptance"]}
        save()
    if "prefill" not in skip:
        results["prefill_batch64"] = {
            ("all_positions" if keep == 0 else "last_position"): run_worker(
                {"kind": "prefill", "bundle": str(bundles["int8"]), "queries": queries, "keep": keep, "repeats": 3},
                work, f"prefill-{keep}")
            for keep in (0, 1)}
        save()
    if "int4" not in skip:
        bundles["int4"] = export_once(checkpoint, work / "bundle-int4", library=library, quantize="int4")
        fixed = {name: run_worker({"kind": "fixed", "bundle": str(bundles[name]), "queries": queries[:24],
                                   "new_tokens": 32, "latency_queries": 12}, work, f"fixed-{name}")
                 for name in ("fp32", "int8", "int4") if name in bundles}
        results["quantization"] = quantization_rows(fixed)
        save()
    save()
    write_plot(results, args.out)
    summarize(results)
    return 0


def quantization_rows(fixed: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The fixed-length workers' rows with each one's share of tokens equal to fp32's (the ids dropped)."""
    reference = fixed.get("fp32")
    out = {}
    for name, row in fixed.items():
        row = dict(row)
        if reference is not None:
            pairs = [(a, b) for ra, rb in zip(row["ids"], reference["ids"], strict=True)
                     for a, b in zip(ra, rb, strict=True)]
            row["token_agreement_with_fp32"] = sum(a == b for a, b in pairs) / len(pairs)
        del row["ids"]
        out[name] = row
    return out


def write_plot(results: dict[str, Any], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["bundles"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for offset, mode in ((-0.2, "plain"), (0.2, "speculative")):
        axes[0].bar([i + offset for i in range(len(names))],
                    [results["bundles"][n][mode]["latency_ms"]["p50"] for n in names], width=0.4, label=mode)
        axes[1].bar([i + offset for i in range(len(names))],
                    [results["bundles"][n][mode]["forward_passes_per_rewrite"] for n in names], width=0.4, label=mode)
    for ax, title in zip(axes, ("p50 latency per rewrite, batch 1 (ms)", "forward passes per rewrite"), strict=True):
        ax.set_xticks(range(len(names)), names)
        ax.set_title(title)
        ax.legend()
    fig.suptitle(f"Speculative decoding from the prompt library ({results['queries']} held-out queries)")
    fig.tight_layout()
    path = out / "speculative.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def summarize(results: dict[str, Any]) -> None:
    for name, row in results["bundles"].items():
        plain, fast = row["plain"], row["speculative"]
        print(f"{name:>15}: p50 {plain['latency_ms']['p50']:.0f} -> {fast['latency_ms']['p50']:.0f} ms "
              f"({row['p50_ratio']:.2f}x), passes {plain['forward_passes_per_rewrite']:.1f} -> "
              f"{fast['forward_passes_per_rewrite']:.1f}, acceptance {fast['acceptance']}, identical "
              f"{row['identical_share']:.3f}, library prompts {row['library_prompt_share']:.2f}")
    for name, row in results.get("prefill_batch64", {}).items():
        print(f"prefill b64 {name}: {row['prefill_ms_median']:.0f} ms, peak RSS {row['peak_rss_mb']:.0f} MB")
    for name, row in results.get("quantization", {}).items():
        print(f"{name}: {row['per_token_ms']:.2f} ms/token, agreement {row.get('token_agreement_with_fp32')}")


if __name__ == "__main__":
    raise SystemExit(main())
