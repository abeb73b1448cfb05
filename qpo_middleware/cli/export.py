"""``qpo export``: turn a trained policy checkpoint into a bundle for the torch-free runtime."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from ._common import console, user_errors


def command(
    checkpoint: Annotated[
        Path,
        typer.Argument(
            help="Policy checkpoint written by `qpo train` (holds qpo_policy.json), or a run directory "
            "(its last finished loop is exported)."
        ),
    ],
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Bundle directory to create (default: RUN/bundle).")
    ] = None,
    quantize: Annotated[
        str | None, typer.Option(help="Quantize for CPU serving: 'int8' (block-wise int8 weights; batch-independent, "
                                 "close to fp32), 'int4' (block-wise 4-bit weights: smaller, further from fp32) "
                                 "or 'int8-dynamic' (ORT dynamic quantization).")
    ] = None,
    fp16: Annotated[bool, typer.Option("--fp16", help="Export in half precision (for GPU serving).")] = False,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an existing bundle at --out.")
    ] = False,
    strategy: Annotated[
        str, typer.Option(help="How the bundle serves by default: 'generate' (the policy writes a prompt), "
                          "'choose' (it picks the best of the run's prompts for each query: the recipe "
                          "docs/benchmarks.md measured), or 'auto': choose for a preference-trained policy (the "
                          "default recipe; its checkpoint carries choice offsets), generate otherwise.")
    ] = "auto",
) -> None:
    """Export a policy checkpoint to a bundle: model.onnx + tokenizer.json + qpo.json (with checksums)."""
    with user_errors():
        from qpo_middleware.training.export import export_bundle
        from qpo_middleware.training.run import RunPaths

        run = RunPaths(checkpoint)
        if run.is_run():  # a run directory: export its final policy
            from qpo_middleware.training.loops import final_checkpoint

            out = out or run.bundle
            checkpoint = final_checkpoint(checkpoint)
        if out is None:
            raise ValueError("Pass --out DIR: where to write the bundle.")
        with console.status("Exporting…") as status:

            def on_step(message: str) -> None:
                console.log(message)
                status.update(message + "…")

            bundle = export_bundle(
                checkpoint, out, quantize=quantize, fp16=fp16, overwrite=overwrite, on_step=on_step,
                generation={} if strategy == "auto" else {"strategy": strategy},
            )
        table = Table(title=f"Bundle {bundle}", show_header=True)
        table.add_column("file")
        table.add_column("size", justify="right")
        for path in sorted(bundle.iterdir()):
            table.add_row(path.name, f"{path.stat().st_size / 1e6:.1f} MB")
        console.print(table)
        console.print(f"[green]Done.[/] Try it: qpo rewrite 'your query' --bundle {bundle}")
