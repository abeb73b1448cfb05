"""``qpo train``: multi-loop offline RL of the prompt policy on a run directory made by ``qpo collect``."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from qpo_middleware.training.config import RECIPES, LoopConfig, TrainConfig, TrainConfigError, help_of

from ._common import console, progress_bar, user_errors


def command(
    ctx: typer.Context,
    run: Annotated[Path, typer.Option(
        help="Run directory made by `qpo collect`, or by `qpo import-oirl` (then --loops 1: there is no target "
             "to score new prompts on). Resumes where it stopped.")],
    recipe: Annotated[str, typer.Option(help=(
        "Named settings; an option given explicitly wins. "
        + " ".join(f"'{name}': {r.summary}." for name, r in RECIPES.items())))] = "default",
    loops: Annotated[int, typer.Option(help=help_of(LoopConfig, "loops"))] = LoopConfig.loops,
    base_model: Annotated[str, typer.Option(help=help_of(LoopConfig, "base_model"))] = "smollm2-135m-instruct",
    epochs: Annotated[int, typer.Option(help=help_of(TrainConfig, "epochs"))] = 3,
    later_epochs: Annotated[int, typer.Option(help=help_of(LoopConfig, "later_epochs"))] = 1,
    learning_rate: Annotated[float, typer.Option(help=help_of(TrainConfig, "learning_rate"))] = 1e-4,
    batch_size: Annotated[int, typer.Option(help=help_of(TrainConfig, "batch_size"))] = 8,
    grad_accum_steps: Annotated[int, typer.Option(help=help_of(TrainConfig, "grad_accum_steps"))] = 1,
    trainable: Annotated[str, typer.Option(help=help_of(TrainConfig, "trainable") + " 'auto': all on GPU, top:6 on CPU.")] = "auto",
    train_policy_tokens: Annotated[bool, typer.Option(help=help_of(TrainConfig, "train_policy_tokens"))] = False,
    frozen_layer_cache_gib: Annotated[float, typer.Option(
        help=help_of(TrainConfig, "frozen_layer_cache_gib"))] = TrainConfig.frozen_layer_cache_gib,
    max_steps: Annotated[int | None, typer.Option(help=help_of(TrainConfig, "max_steps"))] = None,
    num_buckets: Annotated[int, typer.Option(help=help_of(TrainConfig, "num_buckets"))] = 10,
    conditioning: Annotated[str, typer.Option(help=help_of(TrainConfig, "conditioning"))] = TrainConfig.conditioning,
    route_without_steering: Annotated[bool, typer.Option(
        "--route-without-steering/--no-route-without-steering", help=help_of(TrainConfig, "route_without_steering"))] = False,
    route_without_leaning: Annotated[bool, typer.Option(
        "--route-without-leaning/--no-route-without-leaning", help=help_of(TrainConfig, "route_without_leaning"))] = False,
    route_distinct: Annotated[bool, typer.Option(
        "--route-distinct/--no-route-distinct", help=help_of(TrainConfig, "route_distinct"))] = False,
    route_queries: Annotated[int, typer.Option(help=help_of(TrainConfig, "route_queries"))] = 0,
    route_read_queries: Annotated[int, typer.Option(help=help_of(TrainConfig, "route_read_queries"))] = 0,
    query_max_tokens: Annotated[int, typer.Option(help=help_of(TrainConfig, "query_max_tokens"))] = 40,
    prompt_max_tokens: Annotated[int, typer.Option(help=help_of(TrainConfig, "prompt_max_tokens"))] = 40,
    samples_per_query: Annotated[int, typer.Option(help=help_of(LoopConfig, "samples_per_query"))] = 2,
    collect_queries: Annotated[int | None, typer.Option(help=help_of(LoopConfig, "collect_queries"))] = None,
    reward_floor_quantile: Annotated[float, typer.Option(help=help_of(LoopConfig, "reward_floor_quantile"))] = 0.5,
    d0_floor_quantile: Annotated[float, typer.Option(help=help_of(LoopConfig, "d0_floor_quantile"))] = LoopConfig.d0_floor_quantile,
    preference: Annotated[str, typer.Option(help=help_of(LoopConfig, "preference"))] = LoopConfig.preference,
    preference_beta: Annotated[float, typer.Option(help=help_of(LoopConfig, "preference_beta"))] = 0.1,
    preference_pairs_per_query: Annotated[int, typer.Option(
        help=help_of(LoopConfig, "preference_pairs_per_query"))] = 4,
    preference_label_smoothing: Annotated[float, typer.Option(
        help=help_of(LoopConfig, "preference_label_smoothing"))] = 0.0,
    preference_without_steering: Annotated[bool, typer.Option(
        "--preference-without-steering/--no-preference-without-steering", help=help_of(LoopConfig, "preference_without_steering"))] = False,
    preference_epochs: Annotated[int, typer.Option(help=help_of(LoopConfig, "preference_epochs"))] = LoopConfig.preference_epochs,
    preference_learning_rate: Annotated[float | None, typer.Option(
        help=help_of(LoopConfig, "preference_learning_rate"))] = None,
    choice_offset_queries: Annotated[int, typer.Option(help=help_of(LoopConfig, "choice_offset_queries"))] = 200,
    mutations: Annotated[int, typer.Option(help=help_of(LoopConfig, "mutations"))] = 0,
    mutation_model: Annotated[str | None, typer.Option(help=help_of(LoopConfig, "mutation_model"))] = None,
    top_k: Annotated[int, typer.Option(help=help_of(LoopConfig, "top_k"))] = 10,
    top_p: Annotated[float, typer.Option(help=help_of(LoopConfig, "top_p"))] = 0.9,
    temperature: Annotated[float, typer.Option(help=help_of(LoopConfig, "temperature"))] = 1.0,
    device: Annotated[str, typer.Option(help=help_of(TrainConfig, "device"))] = "auto",
    seed: Annotated[int, typer.Option(help=help_of(TrainConfig, "seed"))] = 0,
) -> None:
    """Fine-tune the policy on D0, then for each later loop sample, score, filter, merge and fine-tune again."""
    with user_errors():
        given = given_options(ctx)
        train_values, loop_values = recipe_settings(recipe, ctx.params, given)
        train_values["trainable"] = resolve_trainable(train_values["trainable"], train_values["device"])
        train_config, loop_config = TrainConfig(**train_values), LoopConfig(**loop_values)
        applied = {**RECIPES[recipe].train, **RECIPES[recipe].loops}
        console.print(f"[dim]recipe {recipe}: " + ", ".join(
            f"{k}={v}" + (f" (--{k.replace('_', '-')} given: {ctx.params[k]})" if k in given else "")
            for k, v in applied.items()) + "[/]")
        metrics = train_with_progress(run, train_config, loop_config)
    print_loops(metrics)
    console.print(f"[green]Policy:[/] {metrics[-1].checkpoint}   next: qpo export --run {run}")


def given_options(ctx: typer.Context) -> set[str]:
    """The options of this command given on the command line (or by the environment), not left at their default."""
    # by name: typer may vendor its own click, whose ParameterSource is another enum than click's
    return {name for name in ctx.params if getattr(ctx.get_parameter_source(name), "name", "") != "DEFAULT"}


def recipe_settings(recipe: str, values: dict[str, Any], given: set[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The TrainConfig and LoopConfig fields of ``qpo train``: the option ``values``, with the recipe's settings in
    place of every option not ``given`` on the command line (an explicit option wins over the recipe)."""
    if recipe not in RECIPES:
        raise TrainConfigError(f"recipe must be one of {', '.join(RECIPES)}; got {recipe!r}.")
    chosen = RECIPES[recipe]
    train_names, loop_names = ({f.name for f in fields(c)} for c in (TrainConfig, LoopConfig))
    train = {k: v for k, v in values.items() if k in train_names}
    loops = {k: v for k, v in values.items() if k in loop_names}
    for settings, target in ((chosen.train, train), (chosen.loops, loops)):
        target.update({k: v for k, v in settings.items() if k not in given})
    return train, loops


def resolve_trainable(trainable: str, device: str) -> str:
    """'auto' trains every weight on a GPU and the top 6 layers (+ new token rows) on a CPU."""
    if trainable != "auto":
        return trainable
    import torch

    return "all" if device != "cpu" and torch.cuda.is_available() else "top:6"


def train_with_progress(run: Path, train_config: TrainConfig, loop_config: LoopConfig) -> list:
    from qpo_middleware.training.loops import run_loops

    with progress_bar() as bar:
        job = bar.add_task("loop 1", total=None)

        def on_phase(loop: int, name: str) -> None:  # the phase itself is logged by the library
            bar.update(job, description=f"loop {loop}: {name.split(' ')[0]}", completed=0, total=None)

        def on_step(step: int, total: int, loss: float) -> None:
            bar.update(job, completed=step, total=total, description=f"fine-tune (loss {loss:.3f})")

        return run_loops(run, train_config, loop_config, on_step=on_step, on_phase=on_phase)


def print_loops(metrics: list) -> None:
    table = Table(title="QPO loops")
    for name in ("loop", "trained on", "loss first→last", "new pairs kept/sampled", "new prompts kept/sampled",
                 "mean reward new vs D0", "policy acc (collect)", "policy acc (dev)", "target calls", "time"):
        table.add_column(name, justify="right")
    for m in metrics:
        trained = " + ".join([f"{m.train_records} ex"] * bool(m.train_records)
                             + [f"{m.preference_pairs} DPO pairs"] * bool(m.preference_pairs)) or "0 ex"
        new = f"{m.kept_pairs}/{m.sampled_pairs}" + (f" ({m.sampling})" if m.sampling else "") if m.loop > 1 else "-"
        prompts = f"{m.new_distinct_prompts_kept}/{m.new_distinct_prompts}" if m.loop > 1 else "-"
        reward = (f"{m.mean_reward_sampled:.2f} vs {m.mean_reward_d0:.2f}"
                  if m.mean_reward_sampled is not None else f"- vs {m.mean_reward_d0:.2f}")
        accuracy = [f"{a:.1%} ({m.policy_strategy})" if a is not None else "-"
                    for a in (m.greedy_accuracy_collect, m.greedy_accuracy_dev)]
        table.add_row(str(m.loop), trained, f"{m.first_loss:.3f}→{m.last_loss:.3f}", new, prompts, reward,
                      *accuracy, str(m.target_calls), f"{m.seconds:.0f}s")
    console.print(table)
