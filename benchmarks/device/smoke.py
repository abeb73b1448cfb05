"""CUDA smoke for a lent GPU machine (called by stage1.sh), before the full-size run.

1. The whole quality pipeline (collect -> 2 loops -> benchmark with the torch policy backend ->
   report) on the shipped SST-2 sample, with a tiny random Llama (SmolLM2's tokenizer) as policy
   and target, on the GPU: catches CUDA-only breakage in a minute instead of deep in the real run.
2. Speed probes at SmolLM2-135M's size (its config, random weights): target scoring forward, one
   training step, greedy generation; to size the real run.

Writes ``smoke.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))  # quality.py imports the harness, benchmarks/qpo_bench


def load_quality() -> Any:
    spec = importlib.util.spec_from_file_location("qpo_quality_benchmark", REPO / "benchmarks" / "quality.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def tiny_base(tokenizer_dir: Path, out: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def pipeline(tokenizer_dir: Path, work: Path, device: str = "cuda") -> dict[str, Any]:
    quality = load_quality()
    base = tiny_base(tokenizer_dir, work / "tiny-base")
    profile = quality.Profile(
        name="tiny-cuda", queries=8, prompts="4", prompts_per_query=3, collect_queries=6, test_queries=6,
        target_batch_size=8,
        train={"epochs": 2, "batch_size": 8, "learning_rate": 5e-3, "num_buckets": 4, "prompt_max_tokens": 8,
               "query_max_tokens": 16, "warmup_ratio": 0.0, "trainable": "all"},
        loops={"loops": 2, "samples_per_query": 2, "reward_floor_quantile": 0.0, "top_k": 50,
               "d0_floor_quantile": 0.25},
        bench={"oracle": True, "best_of_n": 2, "quantize": None, "examples_per_label": 2, "bootstrap_samples": 200,
               "policy_backend": "torch", "policy_batch_size": 4},
    )
    started = time.perf_counter()
    payload = quality.run_quality(["sst2_sample"], profile, work / "quality", seed=0, model=str(base), say=print)
    task = payload["tasks"]["sst2_sample"]
    methods = {m["method"]: m for m in task["methods"]}
    for name in ("qpo_loop1", "qpo_loop2", "qpo_best_of_2"):
        assert f"torch on {device}" in methods[name]["description"], methods[name]["description"]
    assert (work / "quality" / "report.md").is_file()
    return {"seconds": time.perf_counter() - started, "accuracy": {k: m["accuracy"] for k, m in methods.items()},
            "environment": payload["environment"]}


def probes(tokenizer_dir: Path) -> dict[str, float]:
    """Milliseconds per operation of a SmolLM2-135M-sized model (random weights) on the GPU."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(tokenizer_dir)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).cuda()
    vocab = config.vocab_size

    def timed(fn: Any, reps: int) -> float:
        fn()
        torch.cuda.synchronize()
        tick = time.perf_counter()
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
        return (time.perf_counter() - tick) * 1000.0 / reps

    out: dict[str, float] = {}
    ids = torch.randint(0, vocab, (64, 128), device="cuda")
    with torch.inference_mode():
        out["score_forward_64x128_ms"] = timed(lambda: model(input_ids=ids).logits[:, -1].float(), 10)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    batch = torch.randint(0, vocab, (32, 96), device="cuda")

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    out["train_step_32x96_bf16_ms"] = timed(step, 10)
    prompt = torch.randint(0, vocab, (64, 48), device="cuda")
    with torch.inference_mode():
        out["generate_64x40_greedy_ms"] = timed(
            lambda: model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=40,
                                   min_new_tokens=40, do_sample=False, pad_token_id=0), 2)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokenizer", type=Path, required=True, help="SmolLM2's tokenizer and config files.")
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--cpu", action="store_true", help="Dry run of the pipeline part on the CPU (no probes).")
    args = parser.parse_args()
    import torch

    if args.cpu:
        print("pipeline", pipeline(args.tokenizer, args.work, device="cpu")["accuracy"])
        return 0
    if not torch.cuda.is_available():
        print("no GPU visible to torch", file=sys.stderr)
        return 2
    result: dict[str, Any] = {"gpu": torch.cuda.get_device_name(0)}
    try:
        result["pipeline"] = pipeline(args.tokenizer, args.work)
    finally:
        result["probes"] = probes(args.tokenizer)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "smoke.json").write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps({k: v for k, v in result.items() if k != "pipeline"}, indent=2))
        if "pipeline" in result:
            print("pipeline", round(result["pipeline"]["seconds"], 1), "s", result["pipeline"]["accuracy"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
