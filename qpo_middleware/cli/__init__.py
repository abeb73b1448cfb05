"""The ``qpo`` command line: one module per command group, registered here.

Each module exposes ``command`` (a Typer command function). Heavy imports
(torch, transformers) happen inside the commands, so ``qpo rewrite`` and
``qpo --help`` stay fast and work on a runtime-only install.
"""

from __future__ import annotations

import logging

import typer
from rich.logging import RichHandler

from . import bench, collect, evaluate, export, import_oirl, quickstart, rewrite, train
from ._common import err_console

app = typer.Typer(
    name="qpo",
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


app.command("collect")(collect.command)
app.command("import-oirl")(import_oirl.command)
app.command("train")(train.command)
app.command("export")(export.command)
app.command("eval")(evaluate.command)
app.command("rewrite")(rewrite.command)
app.command("quickstart")(quickstart.command)
app.command("bench")(bench.command)


def main() -> None:
    app()
