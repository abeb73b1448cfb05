"""``qpo quickstart``: the whole QPO path on the embedded default, end to end, in minutes on a laptop CPU.

collect (SST-2 sample shipped in the package) -> train (the default recipe) -> export -> evaluate
on held-out queries -> a table: no instruction vs the best pool prompt vs QPO, plus
rewrite latency. ``--budget`` scales every size; a GPU is used when present.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer

from ._common import console, progress_bar, user_errors


def command(
    out: Annotated[Path, typer.Option(help="Run directory (re-run the same command to resume).")] = Path("runs/quickstart"),
    budget: Annotated[float, typer.Option(help="Scale of every size (queries, prompts, epochs); 1.0 takes about 9 min on 2 CPU cores.")] = 1.0,
    model: Annotated[str, typer.Option(help="Policy base model and local target.")] = "smollm2-135m-instruct",
    quantize: Annotated[str | None, typer.Option(help="Bundle quantization: int8 (CPU default) or none.")] = "auto",
    seed: Annotated[int, typer.Option(help="Seed of splits, sampling and training.")] = 0,
) -> None:
    """Run collect -> train -> export -> eval on the embedded SmolLM2 and print the comparison."""
    with user_errors():
        if budget <= 0:
            raise ValueError("--budget must be > 0 (1.0 is the default size).")
        started = time.perf_counter()
        import torch

        from qpo_middleware.training.collect import collect
        from qpo_middleware.training.config import RECIPES, CollectConfig, LoopConfig, TrainConfig
        from qpo_middleware.training.evaluate import evaluate
        from qpo_middleware.training.export import export_bundle
        from qpo_middleware.training.io import atomic_write_json
        from qpo_middleware.training.loops import final_checkpoint
        from qpo_middleware.training.run import RunPaths

        from .collect import print_summary
        from .evaluate import print_eval
        from .train import print_loops, train_with_progress

        gpu = torch.cuda.is_available()
        scale = budget * (8 if gpu else 1)
        n = lambda base: max(4, int(round(base * scale)))  # noqa: E731
        # D0: many train queries with a few prompts each (drawn per query) rather than every prompt on
        # few queries: the policy must see many queries to learn which prompt suits which.
        collect_config = CollectConfig(task="sst2_sample", target=model, queries=min(220, n(160)),
                                       collect_queries=min(180, n(32)),  # the sample's pool holds 400 queries
                                       test_queries=min(200, n(100)), prompts=str(min(27, n(14))),
                                       prompts_per_query=n(5), seed=seed, batch_size=32 if gpu else 16)
        # The default recipe (training.config.RECIPES): DPO from the base model on D0's right-vs-wrong prompt
        # pairs; the bundle then chooses one of D0's prompts per query (strategy 'choose'), each offset by its mean
        # log-probability under the base model over a few train queries.
        recipe = RECIPES["default"]
        train_config = TrainConfig(**{**recipe.train, "epochs": max(2, int(round(4 * budget))),
                                      "learning_rate": 2e-4, "batch_size": 8,
                                      "trainable": "all" if gpu else "top:4", "prompt_max_tokens": 32,
                                      "query_max_tokens": 40, "seed": seed})
        loop_config = LoopConfig(**{**recipe.loops, "base_model": model, "choice_offset_queries": n(64),
                                    "seed": seed})

        console.rule("[bold]1/4 collect: score the prompt pool on the target (D0)")
        with progress_bar() as bar:
            job = bar.add_task("scoring pairs", total=None)
            summary = collect(collect_config, out, progress=lambda d, t: bar.update(job, completed=d, total=t))
        print_summary(summary)

        console.rule("[bold]2/4 train: the policy learns which prompt suits which query")
        print_loops(train_with_progress(out, train_config, loop_config))

        console.rule("[bold]3/4 export: ONNX bundle for the torch-free runtime")
        paths = RunPaths(out)
        bundle = paths.bundle
        checkpoint = final_checkpoint(out)
        if _stale(bundle, checkpoint):
            q = ("int8" if not gpu else None) if quantize == "auto" else (None if quantize == "none" else quantize)
            with console.status("exporting (Optimum, then quantization)…"):
                export_bundle(checkpoint, bundle, quantize=q, overwrite=True)
        console.log(f"bundle: {bundle}")

        console.rule("[bold]4/4 eval: held-out test queries, same target")
        with console.status("evaluating…") as status:
            result = evaluate(out, bundle, methods=("none", "best_pool", "qpo"),
                              progress=lambda name: status.update(f"scoring {name}…"))
        print_eval(result)
        wall = time.perf_counter() - started
        atomic_write_json(paths.quickstart_report, {"eval": result.to_dict(), "wall_seconds": wall,
                                                     "budget": budget, "gpu": gpu})
    qpo, best = result.method("qpo"), result.method("best_pool")
    console.print(f"QPO vs best pool prompt: [bold]{(qpo.accuracy - best.accuracy) * 100:+.1f}[/] points   "
                  f"wall time {wall / 60:.1f} min   results: {paths.quickstart_report}")
    console.print(f"Rewrite a query yourself: qpo rewrite \"an instant classic\" --bundle {bundle}")


def _stale(bundle: Path, checkpoint: Path) -> bool:
    """True when there is no bundle yet, or it was exported from another training state than ``checkpoint``'s."""
    from qpo_middleware.bundle import MANIFEST_NAME
    from qpo_middleware.training.export import read_policy_meta

    manifest = bundle / MANIFEST_NAME
    if not manifest.is_file():
        return True
    exported = json.loads(manifest.read_text(encoding="utf-8")).get("training_data_sha256")
    return exported != read_policy_meta(checkpoint).training_data_sha256
