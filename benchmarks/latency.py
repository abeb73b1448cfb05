"""Runtime performance benchmark (issue 6): the torch-free runtime against torch eager
``generate`` and Optimum's ``ORTModelForCausalLM.generate``, on the same policy and inputs.

Usage::

    python benchmarks/latency.py                       # SmolLM2-135M policy, CPU, ~10 min on 2 cores
    python benchmarks/latency.py --checkpoint RUN/policy/loop_2/checkpoint --out DIR

What it does, in one run:

1. Policy: ``--checkpoint`` (a ``qpo train`` checkpoint) or, by default, the embedded
   SmolLM2-135M-Instruct with the policy's tokens added (same architecture and size as a
   trained policy; latency does not depend on the weights' values). Exported once to an fp32
   and an int8 bundle under ``OUT/work/`` (reused on re-runs).
2. Inputs: policy inputs for SST-2 sentences from the package's quick-start sample, the same
   token ids for every engine. Every decode is greedy and exactly ``--new-tokens`` long (EOS
   suppressed), so per-token times compare like for like.
3. Engines, each in its own process (clean peak RSS, no torch in the runtime's): the runtime
   on the int8 and fp32 bundles, Optimum ``ORTModelForCausalLM`` on the same two ONNX files,
   torch eager fp32 ``generate`` on the checkpoint. Each reports load time, batch-1 latency
   p50/p95/p99, per-token time, throughput at batch 1/8/32/64, peak RSS and its outputs
   (greedy parity is checked against torch).
4. The runtime alone: session settings swept (threads, graph level, IO binding), and N
   concurrent callers with and without micro-batching.
5. The floor: bytes of weights read per token (from the ONNX initializers; an embedding
   table read by Gather counts one row) over the measured memory bandwidth.
6. In context: a LangChain call to the local SmolLM2 chat model with and without the
   rewriter in front.

Writes ``OUT/results.json`` and PNG plots; prints a summary. Timings on a shared machine are
noisy: compare ratios inside one run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "benchmarks" / "results" / "latency-cpu"


# ---------------------------------------------------------------------------- workers (one process each)


def _worker(spec: dict[str, Any]) -> dict[str, Any]:
    engine = spec["engine"]
    rows: list[list[int]] = spec["rows"]
    if engine == "runtime":
        return _runtime_worker(spec, rows)
    if engine in ("optimum", "torch"):
        return _hf_worker(spec, rows)
    if engine == "langchain":
        return _langchain_worker(spec)
    raise ValueError(f"unknown engine {engine!r}")


def _runtime_worker(spec: dict[str, Any], rows: list[list[int]]) -> dict[str, Any]:
    from qpo_middleware import PromptOptimizer, RuntimeConfig
    from qpo_middleware.bench import current_rss_mb, measure_concurrency_modes, measure_runtime, peak_rss_mb

    config = RuntimeConfig(**spec.get("config", {}))
    start = time.perf_counter()
    optimizer = PromptOptimizer.from_bundle(spec["bundle"], config=config)
    load_s = time.perf_counter() - start
    rss_loaded = current_rss_mb()
    out: dict[str, Any] = {"load_s": load_s, "rss_after_load_mb": rss_loaded, "config": config.to_dict()}
    if spec.get("mode", "full") == "tune":
        out.update(measure_runtime(optimizer, rows, new_tokens=spec["new_tokens"], batch_sizes=(8,),
                                   latency_queries=spec.get("latency_queries", 8)))
    else:
        out.update(measure_runtime(optimizer, rows, new_tokens=spec["new_tokens"],
                                   batch_sizes=spec["batch_sizes"], latency_queries=spec["latency_queries"]))
        if spec.get("batch_vs_single"):
            # The bundle's own generation (rows stop at EOS): the prompts a user would get.
            single = [optimizer.optimize(q).prompt for q in spec["queries"]]
            batched = [r.prompt for r in optimizer.optimize_batch(spec["queries"])]
            out["prompts"] = single
            out["batch_vs_single_agreement"] = sum(a == b for a, b in zip(single, batched, strict=True)) / len(single)
    for callers in spec.get("concurrency", []):
        out.setdefault("concurrency", []).extend(
            measure_concurrency_modes(spec["bundle"], config, spec["queries"], callers))
    out["peak_rss_mb"] = peak_rss_mb()
    out["torch_imported"] = "torch" in sys.modules
    return out


def _hf_worker(spec: dict[str, Any], rows: list[list[int]]) -> dict[str, Any]:
    import torch

    from qpo_middleware.bench import current_rss_mb, measure_decode, peak_rss_mb
    from qpo_middleware.training.sampling import left_pad

    torch.set_num_threads(spec["threads"])
    start = time.perf_counter()
    if spec["engine"] == "torch":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(spec["checkpoint"], dtype=torch.float32)
        model.eval()
    else:
        import onnxruntime as ort
        from optimum.onnxruntime import ORTModelForCausalLM

        options = ort.SessionOptions()
        options.log_severity_level = 3
        model = ORTModelForCausalLM.from_pretrained(spec["onnx_dir"], file_name="model.onnx", use_cache=True,
                                                    use_io_binding=False, session_options=options)
    load_s = time.perf_counter() - start
    rss_loaded = current_rss_mb()
    new_tokens, suppress, pad = spec["new_tokens"], spec["suppress"], spec["pad_id"]

    def generate(batch: Sequence[Sequence[int]], tokens: int) -> list[list[int]]:
        ids, mask = left_pad(batch, pad)
        width = ids.shape[1]
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=tokens, min_new_tokens=tokens,
                                 do_sample=False, suppress_tokens=suppress, eos_token_id=spec["eos"],
                                 pad_token_id=pad, num_beams=1)
        return out[:, width:].tolist()

    result = measure_decode(generate, rows, new_tokens=new_tokens, batch_sizes=spec["batch_sizes"],
                            latency_queries=spec["latency_queries"])
    return {"load_s": load_s, "rss_after_load_mb": rss_loaded, **result, "peak_rss_mb": peak_rss_mb()}


def _langchain_worker(spec: dict[str, Any]) -> dict[str, Any]:
    from qpo_middleware import PromptOptimizer
    from qpo_middleware.integrations.langchain import with_qpo
    from qpo_middleware.stats import percentiles
    from qpo_middleware.training.chat import local_smollm2_chat

    chat = local_smollm2_chat(max_new_tokens=spec["chat_tokens"])
    optimizer = PromptOptimizer.from_bundle(spec["bundle"], provider="cpu")
    wrapped = with_qpo(chat, optimizer)
    queries = spec["queries"][: spec["calls"]]
    chat.invoke(queries[0])
    wrapped.invoke(queries[0])
    plain_ms, qpo_ms, policy_ms = [], [], []
    for query in queries:  # interleaved, so drift on a shared machine hits both alike
        start = time.perf_counter()
        chat.invoke(query)
        plain_ms.append((time.perf_counter() - start) * 1000.0)
        start = time.perf_counter()
        wrapped.invoke(query)
        qpo_ms.append((time.perf_counter() - start) * 1000.0)
        start = time.perf_counter()
        optimizer.optimize(query)
        policy_ms.append((time.perf_counter() - start) * 1000.0)
    return {"calls": len(queries), "chat_max_new_tokens": spec["chat_tokens"],
            "without_qpo_ms": percentiles(plain_ms), "with_qpo_ms": percentiles(qpo_ms),
            "policy_alone_ms": percentiles(policy_ms)}


def run_worker(spec: dict[str, Any], work: Path, name: str) -> dict[str, Any]:
    """Run one engine in a fresh Python process; its JSON result comes back through a file."""
    spec_path, result_path = work / f"{name}.spec.json", work / f"{name}.result.json"
    spec_path.write_text(json.dumps(spec))
    result_path.unlink(missing_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(spec.get("threads", 2)), "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, __file__, "--worker", str(spec_path), str(result_path)],
                          env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {name} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(result_path.read_text())


# ---------------------------------------------------------------------------- setup


def prepare_policy(checkpoint: Path | None, work: Path) -> Path:
    """A policy checkpoint: the given one, or SmolLM2 with the policy's tokens added (cached in work/)."""
    if checkpoint is not None:
        return checkpoint
    target = work / "checkpoint"
    if (target / "qpo_policy.json").is_file():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qpo_middleware import Template
    from qpo_middleware.training.export import PolicyMeta, write_policy_meta
    from qpo_middleware.training.models import resolve_model
    from qpo_middleware.training.policy import add_policy_tokens

    source = resolve_model()
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    policy = add_policy_tokens(model, tokenizer, num_buckets=10, prompt_max_tokens=40, query_max_tokens=40)
    staging = work / "checkpoint.tmp"
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    write_policy_meta(staging, PolicyMeta(policy, Template(), "sst2", "smollm2-135m-instruct", "0" * 64))
    staging.rename(target)
    return target


def prepare_bundles(checkpoint: Path, work: Path) -> dict[str, Path]:
    from qpo_middleware.training.export import export_bundle

    marker = work / "bundles-source.json"
    source = {"checkpoint": str(checkpoint.resolve())}
    if marker.is_file() and json.loads(marker.read_text()) != source:
        for stale in work.glob("bundle-*"):  # exported from another checkpoint
            shutil.rmtree(stale)
    marker.write_text(json.dumps(source))
    bundles = {}
    for dtype, quantize in (("fp32", None), ("int8", "int8"), ("int8-dynamic", "int8-dynamic")):
        out = work / f"bundle-{dtype}"
        if not (out / "qpo.json").is_file():
            export_bundle(checkpoint, out, quantize=quantize)
        bundles[dtype] = out
    return bundles


def optimum_dir(bundle: Path, checkpoint: Path, work: Path) -> Path:
    """A folder ORTModelForCausalLM loads: the bundle's model.onnx + the checkpoint's config.

    Optimum does not feed the bundle's ``logits_to_keep`` input: the copy holds it as a constant 0
    (every position's logits, as Optimum's own export computes them).
    """
    import numpy as np
    import onnx
    from onnx import numpy_helper

    target = work / f"optimum-{bundle.name}"
    target.mkdir(exist_ok=True)
    for name in os.listdir(bundle):
        if name.startswith("model.onnx") and name != "model.onnx" and not (target / name).exists():
            (target / name).symlink_to((bundle / name).resolve())
    if not (target / "model.onnx").exists():
        model = onnx.load(str(bundle / "model.onnx"), load_external_data=False)
        inputs = [i for i in model.graph.input if i.name == "logits_to_keep"]
        if inputs:
            model.graph.input.remove(inputs[0])
            model.graph.initializer.append(numpy_helper.from_array(np.zeros(1, dtype=np.int64), "logits_to_keep"))
        onnx.save(model, str(target / "model.onnx"))
    for name in ("config.json", "generation_config.json"):
        if (checkpoint / name).is_file():
            (target / name).write_bytes((checkpoint / name).read_bytes())
    return target


def weight_bytes_per_token(model_path: Path) -> dict[str, float]:
    """Bytes of initializers a batch-1 decode step reads: all of them, but one row of a Gather table."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(model_path), load_external_data=True)
    consumers: dict[str, set[str]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, set()).add(node.op_type)
    total = read = 0
    for init in model.graph.initializer:
        array = numpy_helper.to_array(init)
        total += array.nbytes
        if consumers.get(init.name) == {"Gather"} and array.ndim == 2:
            read += array.nbytes // array.shape[0]
        else:
            read += array.nbytes
    return {"initializer_bytes": float(total), "bytes_read_per_token": float(read)}


def policy_rows(bundle: Path, count: int) -> tuple[list[str], list[list[int]]]:
    from qpo_middleware import PromptOptimizer
    from qpo_middleware.training.tasks import get_task

    task = get_task("sst2_sample")
    splits = task.splits(None, seed=0, n_train=0, n_collect=0, n_test=count)
    queries = [e.query for e in splits.test]
    optimizer = PromptOptimizer.from_bundle(bundle, provider="cpu")
    return queries, [optimizer.input_ids(q) for q in queries]


# ---------------------------------------------------------------------------- orchestration


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=None, help="A qpo policy checkpoint (default: SmolLM2 + policy tokens).")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="Output folder (results.json, PNGs, work/).")
    parser.add_argument("--new-tokens", type=int, default=32, help="Tokens decoded per rewrite (fixed length).")
    parser.add_argument("--batch-sizes", default="1,8,32,64", help="Throughput batch sizes.")
    parser.add_argument("--latency-queries", type=int, default=20, help="Single rewrites timed per engine.")
    parser.add_argument("--concurrency", default="8,32", help="Concurrent callers (runtime, int8).")
    parser.add_argument("--threads", type=int, default=None, help="Threads for every engine (default: usable cores).")
    parser.add_argument("--skip", default="", help="Comma-separated parts to skip: torch, optimum, tune, langchain.")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        spec = json.loads(Path(args.worker[0]).read_text())
        Path(args.worker[1]).write_text(json.dumps(_worker(spec)))
        return 0

    started = time.perf_counter()
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    out, work = args.out, args.out / "work"
    work.mkdir(parents=True, exist_ok=True)
    from qpo_bench.environment import environment

    env = environment()
    threads = args.threads or int(env["cpu_cores_usable"] or 1)
    say = lambda message: print(f"[{time.perf_counter() - started:6.0f}s] {message}", flush=True)  # noqa: E731

    say("preparing the policy checkpoint and the fp32 / int8 bundles")
    checkpoint = prepare_policy(args.checkpoint, work)
    bundles = prepare_bundles(checkpoint, work)
    queries, rows = policy_rows(bundles["fp32"], 64)
    manifest = json.loads((bundles["fp32"] / "qpo.json").read_text())
    gen, policy = manifest["generation"], manifest["policy"]
    suppress = sorted({*gen["suppress_token_ids"], *policy["eos_token_ids"]})
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    common = {"rows": rows, "queries": queries, "new_tokens": args.new_tokens, "batch_sizes": batch_sizes,
              "latency_queries": args.latency_queries, "threads": threads}
    results: dict[str, Any] = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "worker"},
        "environment": env, "checkpoint": str(checkpoint), "engines": {},
    }

    def save() -> None:
        results["wall_seconds"] = time.perf_counter() - started
        (out / "results.json").write_text(json.dumps(results, indent=1))

    say("memory bandwidth and weight bytes per token")
    from qpo_middleware.bench import memory_bandwidth_gbs

    bandwidth = memory_bandwidth_gbs()
    results["floor"] = {"bandwidth": bandwidth}
    for dtype, bundle in bundles.items():
        weights = weight_bytes_per_token(bundle / "model.onnx")
        results["floor"][dtype] = {**weights, "per_token_ms": weights["bytes_read_per_token"] / (bandwidth["gbs"] * 1e9) * 1000}

    concurrency = [int(c) for c in args.concurrency.split(",") if c.strip()]
    base_config = {"provider": "cpu", "intra_op_threads": threads}
    plan: list[tuple[str, dict[str, Any]]] = [
        ("runtime-int8", {"engine": "runtime", "bundle": str(bundles["int8"]), "config": base_config,
                          "concurrency": concurrency, "batch_vs_single": True}),
        ("runtime-int8-dynamic", {"engine": "runtime", "bundle": str(bundles["int8-dynamic"]),
                                  "config": base_config, "batch_vs_single": True}),
        ("runtime-fp32", {"engine": "runtime", "bundle": str(bundles["fp32"]), "config": base_config,
                          "batch_vs_single": True}),
    ]
    if "optimum" not in skip:
        plan += [(f"optimum-{d}", {"engine": "optimum", "onnx_dir": str(optimum_dir(bundles[d], checkpoint, work))})
                 for d in ("int8", "fp32")]
    if "torch" not in skip:
        plan.append(("torch-fp32", {"engine": "torch", "checkpoint": str(checkpoint)}))
    for name, spec in plan:
        say(f"engine {name}")
        spec = {**common, **spec, "suppress": suppress, "pad_id": policy["pad_token_id"],
                "eos": policy["eos_token_ids"][0]}
        results["engines"][name] = run_worker(spec, work, name)
        save()

    if "tune" not in skip:
        say("session settings sweep (runtime, int8, batch 1 and 8)")
        results["tuning"] = []
        for intra in sorted({1, threads}):
            for level in ("basic", "extended", "all"):
                for binding in (False, True):
                    config = {"provider": "cpu", "intra_op_threads": intra, "graph_optimization": level,
                              "io_binding": binding}
                    spec = {**common, "engine": "runtime", "mode": "tune", "bundle": str(bundles["int8"]),
                            "config": config, "threads": intra}
                    result = run_worker(spec, work, "tune")
                    results["tuning"].append({"config": config, "per_token_ms": result["per_token_ms"],
                                              "latency_p50_ms": result["latency_ms"]["p50"],
                                              "batch8_rewrites_per_s": result["throughput"]["8"]["rewrites_per_s"]})
                    save()

    if "langchain" not in skip:
        say("LangChain call with and without the rewriter (local SmolLM2 chat model)")
        results["langchain"] = run_worker({"engine": "langchain", "rows": [], "bundle": str(bundles["int8"]),
                                           "queries": queries, "calls": 10, "chat_tokens": 16, "threads": threads},
                                          work, "langchain")
    summarize(results)
    save()
    results["plots"] = [str(p.relative_to(out)) for p in write_latency_plots(results, out)]
    save()
    say(f"done: {out / 'results.json'}")
    print(json.dumps(results["summary"], indent=1))
    return 0


def write_latency_plots(results: dict[str, Any], out: Path) -> list[Path]:
    """latency.png (p50/p95/p99 per engine, floor line), throughput.png (rewrites/s vs batch size),
    concurrency.png (callers vs rewrites/s, with and without micro-batching)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    engines = results["engines"]
    names = list(engines)
    hardware = f"{results['environment']['cpu_model']}, {results['environment']['cpu_cores_usable']} cores"
    paths = []

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    x = range(len(names))
    for offset, key in ((-0.25, "p50"), (0.0, "p95"), (0.25, "p99")):
        left.bar([i + offset for i in x], [engines[n]["latency_ms"][key] for n in names], width=0.25, label=key)
    left.set_xticks(list(x), names, rotation=20)
    left.set_ylabel(f"ms per rewrite ({results['config']['new_tokens']} tokens, batch 1)")
    left.set_title("Rewrite latency")
    left.legend()
    right.bar(list(x), [engines[n]["per_token_ms"] for n in names], color="tab:gray")
    for dtype, style in (("int8", "--"), ("int8-dynamic", "-."), ("fp32", ":")):
        right.axhline(results["floor"][dtype]["per_token_ms"], linestyle=style, color="tab:red",
                      label=f"bandwidth floor ({dtype} weights)")
    right.set_xticks(list(x), names, rotation=20)
    right.set_ylabel("ms per token")
    right.set_title("Per-token time vs the memory-bandwidth floor")
    right.legend()
    fig.suptitle(hardware)
    fig.tight_layout()
    paths.append(out / "latency.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in names:
        sizes = sorted(engines[name]["throughput"], key=int)
        ax.plot([int(s) for s in sizes], [engines[name]["throughput"][s]["rewrites_per_s"] for s in sizes],
                marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size")
    ax.set_ylabel("rewrites / s")
    ax.set_title(f"Throughput ({results['config']['new_tokens']} tokens per rewrite) — {hardware}")
    ax.legend()
    fig.tight_layout()
    paths.append(out / "throughput.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    concurrency = engines["runtime-int8"].get("concurrency")
    if concurrency:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for batching in (False, True):
            rows = sorted((c for c in concurrency if c["micro_batching"] == batching), key=lambda c: c["callers"])
            ax.plot([c["callers"] for c in rows], [c["rewrites_per_s"] for c in rows], marker="o",
                    label="micro-batching" if batching else "one decode per call")
        ax.set_xlabel("concurrent callers (threads)")
        ax.set_ylabel("rewrites / s")
        ax.set_title(f"Runtime int8 under concurrent callers — {hardware}")
        ax.legend()
        fig.tight_layout()
        paths.append(out / "concurrency.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


def summarize(results: dict[str, Any]) -> None:
    """Ratios and parity the issue asks for, computed from this run's numbers only."""
    engines = results["engines"]
    runtime = engines["runtime-int8"]
    summary: dict[str, Any] = {"runtime": "runtime-int8"}
    reference = engines.get("torch-fp32", {}).get("outputs")
    for name, engine in engines.items():
        row = {"per_token_ms": engine["per_token_ms"], "latency_p50_ms": engine["latency_ms"]["p50"],
               "load_s": engine["load_s"], "peak_rss_mb": engine["peak_rss_mb"]}
        if reference is not None:
            same = sum(a == b for a, b in zip(engine["outputs"], reference, strict=True))
            row["greedy_identical_to_torch"] = same / len(reference)
            agree = [sum(x == y for x, y in zip(a, b, strict=True)) / len(a)
                     for a, b in zip(engine["outputs"], reference, strict=True)]
            row["token_agreement_with_torch"] = sum(agree) / len(agree)
        summary[name] = row
    fp32_prompts = engines.get("runtime-fp32", {}).get("prompts")
    for name, engine in engines.items():
        if fp32_prompts and engine.get("prompts"):
            summary[name]["prompts_identical_to_fp32"] = sum(
                a == b for a, b in zip(engine["prompts"], fp32_prompts, strict=True)) / len(fp32_prompts)
            summary[name]["batch_vs_single_agreement"] = engine["batch_vs_single_agreement"]
    for other in ("torch-fp32", "optimum-int8", "optimum-fp32"):
        if other in engines:
            summary[f"speedup_vs_{other}_per_token"] = engines[other]["per_token_ms"] / runtime["per_token_ms"]
            summary[f"speedup_vs_{other}_p50"] = engines[other]["latency_ms"]["p50"] / runtime["latency_ms"]["p50"]
    if "runtime-fp32" in engines and "optimum-fp32" in engines:
        summary["fp32_speedup_vs_optimum_p50"] = (engines["optimum-fp32"]["latency_ms"]["p50"]
                                                  / engines["runtime-fp32"]["latency_ms"]["p50"])
    floor = results["floor"]["int8"]["per_token_ms"]
    summary["floor_int8_per_token_ms"] = floor
    summary["runtime_int8_per_token_over_floor"] = runtime["per_token_ms"] / floor
    if "runtime-fp32" in engines:
        summary["runtime_fp32_per_token_over_floor"] = (engines["runtime-fp32"]["per_token_ms"]
                                                        / results["floor"]["fp32"]["per_token_ms"])
    if "langchain" in results:
        lc = results["langchain"]
        summary["langchain_added_ms_p50"] = lc["with_qpo_ms"]["p50"] - lc["without_qpo_ms"]["p50"]
    results["summary"] = summary


if __name__ == "__main__":
    sys.exit(main())
