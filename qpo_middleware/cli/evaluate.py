"""``qpo eval``: QPO prompts against task-level baselines on a run's held-out queries."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from ._common import console, user_errors


def command(
    run: Annotated[Path, typer.Option(help="Run directory made by `qpo collect` / `qpo train`.")],
    bundle: Annotated[Path | None, typer.Option(help="Bundle to evaluate (default: RUN/bundle).")] = None,
    split: Annotated[str, typer.Option(help="Split to evaluate on: test or collect.")] = "test",
    methods: Annotated[str | None, typer.Option(
        help="Comma-separated methods out of none, default, best_pool, qpo (default: all).")] = None,
    limit: Annotated[int | None, typer.Option(help="Evaluate only the first N queries of the split.")] = None,
    out: Annotated[Path | None, typer.Option(help="Write the results as JSON to OUT/results.json.")] = None,
) -> None:
    """Score each method on the same held-out queries and target; print accuracy with 95% bootstrap intervals."""
    with user_errors():
        from qpo_middleware.training.evaluate import METHODS, evaluate
        from qpo_middleware.training.io import atomic_write_json
        from qpo_middleware.training.run import RunPaths

        names = [m.strip() for m in methods.split(",") if m.strip()] if methods else list(METHODS)
        bundle = bundle or RunPaths(run).bundle  # read by the qpo method only
        with console.status("evaluating…") as status:
            result = evaluate(run, bundle, split=split, methods=names, limit=limit,
                              progress=lambda name: status.update(f"scoring {name}…"))
        if out:
            atomic_write_json(out / "results.json", result.to_dict())
    print_eval(result)


def print_eval(result: Any) -> None:
    table = Table(title=f"{result.task}: held-out {result.split} accuracy on {result.target} ({result.queries} queries)")
    for name in ("method", "accuracy", "95% CI", "prompt words", "policy p50 latency", "prompt"):
        table.add_column(name, justify="right" if name not in ("method", "prompt") else "left")
    for m in result.methods:
        prompt = "(per query)" if m.prompt is None else (m.prompt or "(none)")
        latency = f"{m.policy_latency_ms_p50:.0f} ms" if m.policy_latency_ms_p50 is not None else "-"
        table.add_row(m.method, f"{m.accuracy:.1%}", f"{m.ci_low:.1%} - {m.ci_high:.1%}", f"{m.mean_prompt_words:.1f}",
                      latency, prompt if len(prompt) < 60 else prompt[:57] + "...")
    console.print(table)
    for m in result.methods:
        if m.steered_share is None:
            continue
        console.print(
            f"[dim]leakage check, {m.method}:[/] {m.label_leak_share:.0%} of its prompts name one label "
            f"(accuracy with those sent the best pool prompt: {_pct(m.accuracy_without_leaks)}); "
            f"{m.steered_share:.0%} steer the target to one label on D0, of the {m.steering_checked_share:.0%} "
            f"D0 could judge (without them: {_pct(m.accuracy_without_steering)}); {_share(m.leaning_share)} lean "
            f"it to one label (without them: {_pct(m.accuracy_without_leaning)}). A gain that the without-figures "
            "lose comes from leaning the target to a label, not from better prompts.")
    for sample in result.examples[:3]:
        console.print(f"[dim]query:[/] {sample['query'][:80]}\n[dim]  qpo prompt:[/] {json.dumps(sample['prompt'])}")


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def _share(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"
