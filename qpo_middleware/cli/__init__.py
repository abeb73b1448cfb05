"""The ``qpo`` command line: one module per command, loaded only when that command runs.

``import qpo_middleware.cli`` and ``qpo --help`` import no command module and nothing of
``qpo_middleware.training``: the help list comes from :data:`COMMANDS`. ``qpo rewrite`` and
``qpo bench`` need only the runtime (``pip install 'qpo-middleware[cpu]'``); the training
commands import torch and transformers inside, and on a runtime-only install they stop with
the ``pip install`` line that adds the ``train`` extra (see ``_common.user_errors``).
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from typing import Any

import typer
import typer.core
import typer.main
from rich.logging import RichHandler

from ._common import err_console, user_errors


@dataclass(frozen=True)
class CommandSpec:
    """A command of ``qpo``: the module under ``qpo_middleware.cli`` that defines ``command``, and its
    one-line help (the first line of that function's docstring; a test keeps the two equal)."""

    module: str
    help: str


COMMANDS: dict[str, CommandSpec] = {
    "collect": CommandSpec("collect", "Score every (train query, pool prompt) pair on the target and write D0 "
                           "to OUT/dataset.jsonl."),
    "import-oirl": CommandSpec("import_oirl", "Write the Prompt-OIRL per-(query, prompt) correctness logs to "
                               "OUT/dataset.jsonl as loop-0 records."),
    "train": CommandSpec("train", "Fine-tune the policy on D0, then for each later loop sample, score, filter, "
                         "merge and fine-tune again."),
    "export": CommandSpec("export", "Export a policy checkpoint to a bundle: model.onnx + tokenizer.json + "
                          "qpo.json (with checksums)."),
    "eval": CommandSpec("evaluate", "Score each method on the same held-out queries and target; print accuracy "
                        "with 95% bootstrap intervals."),
    "rewrite": CommandSpec("rewrite", "Show the prompt the policy writes for QUERY and the final text sent to the "
                           "target LLM."),
    "quickstart": CommandSpec("quickstart", "Run collect -> train -> export -> eval on the embedded "
                              "SmolLM2 and print the comparison."),
    "bench": CommandSpec("bench", "Latency (p50/p95/p99), per-token time, throughput per batch size, "
                         "concurrency, load time and RSS."),
    "serve": CommandSpec("serve", "Serve an OpenAI-compatible proxy that rewrites each chat request's query with "
                         "the policy."),
}


def load_command(name: str) -> typer.core.TyperCommand:
    """Import the module of command ``name`` and build its click command (the one place that does)."""
    module = importlib.import_module(f"{__name__}.{COMMANDS[name].module}")
    single = typer.Typer(add_completion=False, pretty_exceptions_show_locals=False)
    single.command(name)(module.command)
    command = typer.main.get_command(single)
    assert isinstance(command, typer.core.TyperCommand)
    return command


class LazyGroup(typer.core.TyperGroup):
    """A command group that imports a command's module only when the command is run (or its own
    ``--help`` is asked for); listing the commands uses :data:`COMMANDS` and imports nothing."""

    def list_commands(self, ctx: Any) -> list[str]:
        return [*COMMANDS, *(name for name in super().list_commands(ctx) if name not in COMMANDS)]

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        if cmd_name in self.commands or cmd_name not in COMMANDS:
            return super().get_command(ctx, cmd_name)
        if getattr(self, "_resolving", False):  # the command is about to run: load it for real
            with user_errors():
                command = load_command(cmd_name)
            self.commands[cmd_name] = command
            return command
        spec = COMMANDS[cmd_name]
        return typer.core.TyperCommand(cmd_name, help=spec.help, short_help=spec.help)

    def resolve_command(self, ctx: Any, args: list[str]) -> Any:
        self._resolving = True
        try:
            return super().resolve_command(ctx, args)
        finally:
            self._resolving = False


app = typer.Typer(
    name="qpo",
    cls=LazyGroup,
    help="Query-dependent prompt optimization: collect, train, export, evaluate and serve a prompt policy.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
)


@app.callback()
def _main(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show debug logs."),
) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(console=err_console, show_path=False, rich_tracebacks=False)],  # logs: stderr
        force=True,
    )
    for noisy in ("httpx", "urllib3", "filelock", "transformers", "optimum", "onnxruntime"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def main() -> None:
    app()
