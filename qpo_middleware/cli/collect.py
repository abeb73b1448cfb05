"""``qpo collect``: benchmark the prompt pool on the target and write the offline dataset D0."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape
from rich.table import Table

from qpo_middleware.training.config import CollectConfig, help_of

from ._common import console, progress_bar, user_errors

if TYPE_CHECKING:
    from qpo_middleware.training.collect import CollectSummary


def command(
    task: Annotated[str, typer.Option(help="Built-in task (sst2, mr, cr, ag_news, tweet_emotion, gsm8k, svamp) or a task.json spec.")] = "sst2",
    target: Annotated[str, typer.Option(help="Target LLM: model name/path, or a LangChain chat model as module:factory.")] = "smollm2-135m-instruct",
    queries: Annotated[int, typer.Option(help="Train queries to score (the D0 query set).")] = 50,
    prompts: Annotated[str, typer.Option(help=help_of(CollectConfig, "prompts"))] = "all",
    induce: Annotated[int, typer.Option(help=help_of(CollectConfig, "induce"))] = 0,
    inducer: Annotated[str, typer.Option(help=help_of(CollectConfig, "inducer"))] = CollectConfig.inducer,
    induce_shots: Annotated[int, typer.Option(help=help_of(CollectConfig, "induce_shots"))] = 4,
    mutate: Annotated[int, typer.Option(help=help_of(CollectConfig, "mutate"))] = 0,
    mutate_from: Annotated[int, typer.Option(help=help_of(CollectConfig, "mutate_from"))] = 4,
    mutate_plain: Annotated[bool, typer.Option("--mutate-plain", help=help_of(CollectConfig, "mutate_plain"))] = False,
    prompts_per_query: Annotated[int, typer.Option(help="Score only this many pool prompts per train query, drawn per query (seeded); 0 = every prompt. More queries for the same target calls.")] = 0,
    out: Annotated[Path, typer.Option(help="Run directory (created; re-run the same command to resume).")] = Path("runs/sst2"),
    collect_queries: Annotated[int, typer.Option(help="Held-out queries for the training loops.")] = 100,
    test_queries: Annotated[int, typer.Option(help="Held-out test queries.")] = 100,
    dev_queries: Annotated[int, typer.Option(help=help_of(CollectConfig, "dev_queries"))] = 0,
    shots: Annotated[int, typer.Option(help="Few-shot demonstrations per query (0 = zero-shot).")] = 0,
    seed: Annotated[int, typer.Option(help="Seed of the splits and demonstrations.")] = 0,
    data_dir: Annotated[str | None, typer.Option(help="Data collection root (default: $QPO_DATA).")] = None,
    batch_size: Annotated[int, typer.Option(help="Pairs per forward pass on a local target.")] = 16,
    no_empty: Annotated[bool, typer.Option("--no-empty", help="Do not score the empty prompt (no instruction).")] = False,
    target_concurrency: Annotated[int, typer.Option(help="Chat-model target: calls in flight at once.")] = 8,
    target_retries: Annotated[int, typer.Option(help="Chat-model target: retries of a failed call (exponential backoff).")] = 3,
    target_timeout: Annotated[float | None, typer.Option(help="Chat-model target: seconds before a call without a reply fails (and is retried).")] = None,
    reward_nll: Annotated[str, typer.Option(help="NLL in the reward: 'label_set' (gold renormalised over the label words) or 'vocab' (over the whole vocabulary, the paper's literal reading).")] = "label_set",
) -> None:
    """Score every (train query, pool prompt) pair on the target and write D0 to OUT/dataset.jsonl."""
    with user_errors():
        from qpo_middleware.training.collect import collect
        from qpo_middleware.training.config import RewardConfig
        from qpo_middleware.training.run import RunPaths

        config = CollectConfig(task=task, target=target, queries=queries, prompts=prompts,
                               collect_queries=collect_queries, test_queries=test_queries, dev_queries=dev_queries,
                               shots=shots, seed=seed, data_dir=data_dir, batch_size=batch_size, include_empty=not no_empty,
                               prompts_per_query=prompts_per_query, induce=induce, inducer=inducer,
                               induce_shots=induce_shots, mutate=mutate, mutate_from=mutate_from, mutate_plain=mutate_plain,
                               rewards=RewardConfig(nll=reward_nll), target_concurrency=target_concurrency,
                               target_retries=target_retries, target_timeout=target_timeout)
        with progress_bar() as bar:
            inducing = bar.add_task("inducing prompts", total=config.induce, visible=bool(config.induce))
            job = bar.add_task("scoring pairs", total=None)
            summary = collect(config, out, progress=lambda done, total: bar.update(job, completed=done, total=total),
                              induce_progress=lambda n: bar.advance(inducing, n))
    print_summary(summary)
    console.print(f"[green]D0 written:[/] {RunPaths(out).dataset} ({summary.dataset_records} records)")


def print_summary(summary: CollectSummary) -> None:
    table = Table(title=f"{summary.task} on {summary.target}: accuracy per prompt over {summary.queries} train queries")
    table.add_column("prompt")
    table.add_column("source", style="dim")
    table.add_column("accuracy", justify="right")
    for stats in summary.prompts:
        text = stats.prompt if stats.prompt else "(no instruction)"
        table.add_row(text if len(text) <= 70 else text[:67] + "...", stats.prompt_id, f"{stats.accuracy:.1%}")
    console.print(table)
    accuracies = [s.accuracy for s in summary.prompts]
    console.print(
        f"best single prompt: [bold]{summary.best_prompt.accuracy:.1%}[/] ({summary.best_prompt.prompt_id})   "
        f"spread: {min(accuracies):.1%} - {max(accuracies):.1%}   per-query oracle: [bold]{summary.oracle_accuracy:.1%}[/]"
    )
    for kind, made in (("induced prompts", summary.induction), ("variations", summary.mutation)):
        if made is not None:
            why = ", ".join(f"{reason} {count}" for reason, count in made.dropped.items()) or "none"
            console.print(f"{kind} ({escape(made.inducer)}): asked {made.asked}, kept [bold]{made.kept}[/], "
                          f"dropped {made.asked - made.kept} ({why})")
    console.print(
        f"target calls: {summary.target_calls}   from cache: {summary.cached_pairs}   failed: {summary.failed_pairs}   "
        f"tokens scored: {summary.tokens_scored:,}   new records: {summary.records_written}"
    )
