"""Shared CLI helpers: the rich console and turning library errors into clean exits."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

console = Console()
err_console = Console(stderr=True)


# Top-level modules that only the `train` extra installs: a command that needs one of them on a
# runtime-only install (`pip install 'qpo-middleware[cpu]'`) says how to add the extra.
TRAIN_EXTRA_MODULES = frozenset({"torch", "transformers", "optimum", "accelerate", "gguf", "safetensors", "onnx",
                                 "onnx_ir", "langchain_huggingface"})
TRAIN_EXTRA_INSTALL = "pip install 'qpo-middleware[cpu,train]'"


def missing_extra(exc: BaseException) -> str | None:
    """The fix for an import error caused by a missing `train` extra, else None."""
    name = getattr(exc, "name", None) or ""
    if isinstance(exc, ModuleNotFoundError) and name.split(".")[0] in TRAIN_EXTRA_MODULES:
        return (f"this command needs the training extra (torch, transformers, optimum), and {name!r} is not "
                f"installed: {TRAIN_EXTRA_INSTALL} (use [gpu,train] with onnxruntime-gpu).")
    return None


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Print expected errors (bad input, missing files, a missing extra) as one red line and exit 2, without
    a traceback."""
    try:
        yield
    except (ValueError, FileNotFoundError, RuntimeError, ImportError) as exc:
        # escape: a message may hold brackets ("[cpu,train]", a file name) that rich would read as markup
        err_console.print(f"[bold red]error:[/] {escape(missing_extra(exc) or str(exc))}")
        raise typer.Exit(code=2) from None


def progress_bar() -> Progress:
    """The one progress bar style of every long step; log lines go through ``bar.console.log``."""
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TimeRemainingColumn(), console=console)
