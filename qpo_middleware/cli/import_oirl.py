"""``qpo import-oirl``: import the Prompt-OIRL LLaMA-2 prompting logs as an offline dataset (D0)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from ._common import console, user_errors

if TYPE_CHECKING:
    from qpo_middleware.training.oirl import ImportSummary


def command(
    dataset: Annotated[
        str, typer.Option(help="Prompt-OIRL dataset: gsm8k, svamp (the SVAMP CV pool) or mawps.")
    ] = "gsm8k",
    split: Annotated[
        str, typer.Option(help="train, test or all; svamp/mawps are split by distinct question (qid).")
    ] = "train",
    prompts: Annotated[
        str, typer.Option(help="'base' (the 6 training prompts) or 'all' (16, GPT-4 prompts on test only).")
    ] = "base",
    max_queries: Annotated[
        int | None, typer.Option(help="Keep a seeded random sample of this many queries (default: all).")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the --max-queries sample.")] = 0,
    out: Annotated[
        Path | None,
        typer.Option(help="Dataset directory (default: runs/oirl_<dataset>); re-runs append nothing new."),
    ] = None,
    data_dir: Annotated[
        str | None,
        typer.Option(
            envvar="QPO_DATA",
            help="Data collection root holding prompt_oirl/ and gsm8k/ (default: $QPO_DATA).",
        ),
    ] = None,
) -> None:
    """Write the Prompt-OIRL per-(query, prompt) correctness logs to OUT/dataset.jsonl as loop-0 records."""
    out = out if out is not None else Path("runs") / f"oirl_{dataset}"
    with user_errors():
        from qpo_middleware.training.oirl import import_prompt_oirl
        from qpo_middleware.training.run import RunPaths

        summary = import_prompt_oirl(
            data_dir, dataset, out, split=split, prompts=prompts, max_queries=max_queries, seed=seed
        )
    print_summary(summary)
    console.print(f"[green]dataset:[/] {RunPaths(out).dataset} ({summary.dataset_records} records)")


def print_summary(summary: ImportSummary) -> None:
    table = Table(
        title=f"Prompt-OIRL {summary.dataset}/{summary.split} on LLaMA-2-7B-chat ({summary.queries} queries)"
    )
    table.add_column("prompt")
    table.add_column("queries", justify="right")
    table.add_column("accuracy", justify="right")
    for alias in sorted(summary.prompts, key=lambda a: -summary.accuracy[a]):
        table.add_row(f"oirl:{alias}", str(summary.pairs[alias]), f"{summary.accuracy[alias]:.1%}")
    console.print(table)
    console.print(
        f"best single prompt: [bold]{summary.best_accuracy:.1%}[/] (oirl:{summary.best_prompt})   "
        f"per-query oracle: [bold]{summary.oracle_accuracy:.1%}[/]   new records: {summary.records_written}"
    )
    template = summary.template
    console.print(
        f"task {summary.task}; template: prompt placed {template.placement} the query, "
        f"separator {template.separator!r}"
    )
