"""Shared CLI helpers: the rich console and turning library errors into clean exits."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import typer
from rich.console import Console

console = Console()
err_console = Console(stderr=True)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Print expected errors (bad input, missing files) as one red line and exit 2, without a traceback."""
    try:
        yield
    except (ValueError, FileNotFoundError, RuntimeError, ImportError) as exc:
        err_console.print(f"[bold red]error:[/] {exc}")
        raise typer.Exit(code=2) from None
