"""``qpo rewrite``: write a prompt for one query with a bundle (torch-free)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Annotated

import typer
from rich.panel import Panel
from rich.text import Text

from ._common import console, user_errors


def command(
    query: Annotated[str, typer.Argument(help="The query to rewrite.")],
    bundle: Annotated[Path, typer.Option("--bundle", "-b", help="Bundle directory made by `qpo export`.")],
    sample: Annotated[
        bool, typer.Option("--sample", help="Sample the prompt instead of greedy decoding.")
    ] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
    strategy: Annotated[
        str | None, typer.Option(help="'generate' (write a prompt) or 'choose' (pick the best library prompt); "
                                 "default: the bundle's.")
    ] = None,
) -> None:
    """Show the prompt the policy writes for QUERY and the final text sent to the target LLM."""
    with user_errors():
        from qpo_middleware.runtime import PromptOptimizer

        optimizer = PromptOptimizer.from_bundle(bundle)
        result = optimizer.optimize(query, do_sample=True if sample else None, strategy=strategy)
    if json_out:
        typer.echo(json.dumps(dataclasses.asdict(result), ensure_ascii=False, indent=2))
        return
    console.print(Panel(Text(result.prompt or "(empty prompt)"), title="prompt", border_style="cyan"))
    console.print(Panel(Text(result.text), title="text sent to the target", border_style="green"))
    console.print(
        Text(f"{result.tokens} tokens in {result.latency_ms:.0f} ms on {optimizer.provider}", style="dim")
    )
