"""The runtime on a GPU (issue 16's device check): fp16 bundle, CUDA provider, IO binding.

Builds a policy of SmolLM2-135M's shape (its config and tokenizer, random weights: latency does not
depend on the weights' values), exports it with ``qpo export --fp16``'s code path, and measures
the runtime with ``provider="cuda"`` and IO binding: p50/p95 latency of a 32-token rewrite at batch 1
and rewrites/s at batch 64 (fixed-length greedy decodes, EOS suppressed, as ``benchmarks/latency.py``
measures on CPU). Targets on an H100/H200: p50 <= 25 ms and >= 1,500 rewrites/s at batch 64.

    python benchmarks/device/gpu_latency.py --tokenizer DIR --work /tmp/qpo-gpu/latency --out "$OUT"

``--provider cpu`` runs the same steps on this machine (a smoke of the script, not a GPU number).
Writes ``gpu_latency.json`` under ``--out``. Runs in about 2 minutes on an H200 (the export is most of it).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

P50_TARGET_MS = 25.0
THROUGHPUT_TARGET = 1500.0


def random_policy(tokenizer_dir: Path, out: Path, layers: int | None) -> Path:
    """SmolLM2's config and tokenizer with random weights, the policy's tokens added, saved as a checkpoint."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from qpo_middleware import Template
    from qpo_middleware.training.export import PolicyMeta, write_policy_meta
    from qpo_middleware.training.policy import add_policy_tokens

    config = AutoConfig.from_pretrained(tokenizer_dir)
    if layers:
        config.num_hidden_layers = layers
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    policy = add_policy_tokens(model, tokenizer, num_buckets=10, prompt_max_tokens=40, query_max_tokens=40)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    write_policy_meta(out, PolicyMeta(policy, Template(), "sst2", "smollm2-135m-shape-random", "0" * 64))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokenizer", type=Path, required=True, help="SmolLM2's tokenizer and config.json.")
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--provider", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--layers", type=int, default=None, help="Fewer layers (CPU smoke only).")
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args(argv)

    if args.provider == "cuda":  # onnxruntime-gpu finds CUDA and cuDNN in the nvidia-* wheels torch brought
        import onnxruntime

        if hasattr(onnxruntime, "preload_dlls"):
            onnxruntime.preload_dlls()
    from qpo_middleware import PromptOptimizer, RuntimeConfig
    from qpo_middleware.bench import measure_runtime, peak_rss_mb
    from qpo_middleware.training.export import export_bundle

    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"command": " ".join(["python", *sys.argv]), "provider": args.provider,
                              "python": platform.python_version()}
    try:
        result["gpu"] = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                                        "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()
    except OSError:
        result["gpu"] = None
    start = time.perf_counter()
    checkpoint = random_policy(args.tokenizer, args.work / "checkpoint", args.layers)
    fp16 = args.provider == "cuda"
    bundle = export_bundle(checkpoint, args.work / "bundle", fp16=fp16, library={}, overwrite=True)
    result["export_s"] = time.perf_counter() - start
    result["dtype"] = "fp16" if fp16 else "fp32"
    optimizer = PromptOptimizer.from_bundle(bundle, config=RuntimeConfig(provider=args.provider,
                                                                         io_binding=args.provider == "cuda"))
    result["runtime"] = optimizer.info()
    sentences = [line.strip() for line in (Path(__file__).resolve().parents[2] / "training" / "sample"
                                           / "sst2_sample.tsv").read_text(encoding="utf-8").splitlines()[1:80]]
    rows = [optimizer.input_ids(s.split("\t")[0]) for s in sentences if s]
    measured = measure_runtime(optimizer, rows, new_tokens=args.new_tokens, batch_sizes=(1, 8, 64),
                               latency_queries=30)
    measured.pop("outputs")
    result.update(measured)
    result["peak_rss_mb"] = peak_rss_mb()
    p50, throughput = measured["latency_ms"]["p50"], measured["throughput"]["64"]["rewrites_per_s"]
    result["targets"] = {"p50_ms": P50_TARGET_MS, "rewrites_per_s_batch64": THROUGHPUT_TARGET,
                         "p50_met": p50 <= P50_TARGET_MS, "throughput_met": throughput >= THROUGHPUT_TARGET}
    (args.out / "gpu_latency.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"{result['dtype']} on {optimizer.provider}: p50 {p50:.1f} ms (target {P50_TARGET_MS}), batch 64 "
          f"{throughput:.0f} rewrites/s (target {THROUGHPUT_TARGET:.0f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
