"""The `qpo` command line: real runs on a tiny model, and clean errors (exit 2, one line, the fix)."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from qpo_middleware.cli import app
from qpo_middleware.training.run import RunPaths

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny random Llama with the SmolLM2 tokenizer."""
    from _tiny_policy import save_tiny_checkpoint

    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


def test_collect_train_export_eval_rewrite(tmp_path: Path, tiny_model: str) -> None:
    run = tmp_path / "run"
    paths = RunPaths(run)
    result = runner.invoke(app, ["collect", "--task", "sst2_sample", "--target", tiny_model, "--queries", "6",
                                 "--prompts", "3", "--collect-queries", "4", "--test-queries", "5", "--out", str(run)])
    assert result.exit_code == 0, result.output
    assert "per-query oracle" in result.output and "target calls: 24" in result.output
    again = runner.invoke(app, ["collect", "--task", "sst2_sample", "--target", tiny_model, "--queries", "6",
                                "--prompts", "3", "--collect-queries", "4", "--test-queries", "5", "--out", str(run)])
    assert "from cache: 24" in again.output and "new records: 0" in again.output

    # The paper's recipe: the tiny random target is right on every prompt of a query or on none, so the default
    # recipe's right-vs-wrong pairs do not exist here (tests/test_real_pipeline.py runs it on SmolLM2).
    result = runner.invoke(app, ["train", "--run", str(run), "--recipe", "paper", "--loops", "2",
                                 "--base-model", tiny_model, "--epochs", "1", "--num-buckets", "4",
                                 "--prompt-max-tokens", "6", "--trainable", "all", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "QPO loops" in result.output
    assert "recipe paper: conditioning=absolute, d0_floor_quantile=0.5, preference=off" in result.output
    import json

    loop1 = json.loads(paths.metrics(1).read_text())
    assert loop1["preference_pairs"] == 0 and 0 < loop1["train_records"] < 24  # supervised, on D0's better half

    result = runner.invoke(app, ["export", str(run)])
    assert result.exit_code == 0, result.output
    assert (paths.bundle / "qpo.json").is_file()

    result = runner.invoke(app, ["eval", "--run", str(run), "--methods", "none,best_pool,qpo", "--out", str(run)])
    assert result.exit_code == 0, result.output
    assert "best_pool" in result.output and paths.eval_results.is_file()
    assert "leakage check, qpo:" in result.output and "leakage check, best_pool" not in result.output

    checked = {m["method"]: m for m in json.loads(paths.eval_results.read_text())["methods"]}
    assert checked["best_pool"]["steered_share"] is None  # a task-level method: nothing to check per query
    assert 0.0 <= checked["qpo"]["steered_share"] <= 1.0 and checked["qpo"]["label_leak_share"] is not None

    result = runner.invoke(app, ["rewrite", "a fine film", "--bundle", str(paths.bundle)])
    assert result.exit_code == 0, result.output
    assert "a fine film" in result.output

    # Strategy 'choose': the run's prompts are the candidates, per call or as the bundle's default.
    from qpo_middleware.training.dataset import OfflineDataset

    known = {r.prompt for r in OfflineDataset(run).records}
    result = runner.invoke(app, ["rewrite", "a fine film", "--bundle", str(paths.bundle), "--strategy", "choose",
                                 "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["prompt"] in known
    result = runner.invoke(app, ["export", str(run), "--out", str(tmp_path / "choose"), "--strategy", "choose"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["rewrite", "a fine film", "--bundle", str(tmp_path / "choose"), "--json"])
    assert result.exit_code == 0 and json.loads(result.stdout)["prompt"] in known, result.output
    result = runner.invoke(app, ["rewrite", "a fine film", "--bundle", str(tmp_path / "choose"), "--sample"])
    assert result.exit_code != 0 and "strategy='generate'" in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["collect", "--task", "imdb"], "Unknown task"),
        (["collect", "--task", "sst2_sample", "--queries", "0"], "queries must be positive"),
        (["collect", "--task", "sst2_sample", "--prompts", "nope.json"], "--prompts"),
        (["train", "--run", "{tmp}"], "qpo collect"),
        (["train", "--run", "{tmp}", "--preference-label-smoothing", "1.5"], "preference_label_smoothing must be in [0, 1]"),
        (["train", "--run", "{tmp}", "--recipe", "best"], "recipe must be one of default, paper, route"),
        (["train", "--run", "{tmp}", "--recipe", "paper", "--route-distinct"],
         "route_distinct only applies to --conditioning label_route"),
        (["export", "{tmp}", "--out", "{tmp}/b"], "qpo_policy.json"),
        (["eval", "--run", "{tmp}"], "qpo collect"),
    ],
)
def test_errors_are_one_line_with_the_fix(tmp_path: Path, args: list[str], message: str) -> None:
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    if args[0] == "collect":
        args += ["--out", str(tmp_path / "run"), "--target", "/nonexistent-model"]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output


def test_recipe_settings_under_explicit_options() -> None:
    """`qpo train --recipe NAME` sets the recipe's fields, except those given on the command line; every field a
    recipe sets is a `qpo train` option, so each can be overridden."""
    from qpo_middleware.cli import load_command
    from qpo_middleware.cli.train import given_options, recipe_settings
    from qpo_middleware.training.config import RECIPES, LoopConfig, TrainConfig

    options = {p.name for p in load_command("train").params}
    for name, recipe in RECIPES.items():
        assert set(recipe.train) | set(recipe.loops) <= options, name
    values = {"epochs": 3, "learning_rate": 1e-4, "conditioning": "query_rank", "route_queries": 0,
              "preference": "instead", "loops": 1, "seed": 7}
    train, loops = recipe_settings("route", values, given={"epochs"})
    assert train["epochs"] == 3 and train["learning_rate"] == 5e-5 and train["conditioning"] == "label_route"
    assert train["route_queries"] == 1000 and train["route_distinct"] and train["trainable"] == "all"
    assert loops["preference"] == "off" and loops["loops"] == 1 and train["seed"] == loops["seed"] == 7
    TrainConfig(**train), LoopConfig(**loops)  # a valid pair
    # a recipe's switch can be turned off: route_distinct needs as many non-leaning prompts as labels
    ctx = load_command("train").make_context("train", ["--run", "x", "--recipe", "route", "--no-route-distinct"])
    assert ctx.params["route_distinct"] is False
    given = given_options(ctx)
    assert given == {"run", "recipe", "route_distinct"}
    train, _ = recipe_settings("route", ctx.params, given)
    assert train["route_distinct"] is False and train["route_without_leaning"] is True
    train, loops = recipe_settings("default", values, given=set())
    assert loops["preference_learning_rate"] == 1e-4 and train["conditioning"] == "query_rank"
