"""`mmret export`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from mmret.cli.app import Checkpoint, RunsDir, app, command

FORMATS = "peft, onnx, openvino or sentence-transformers"  # the built-in formats, named without importing them


@app.command()
@command
def export(
    run: Annotated[Optional[str], typer.Argument(
        help="Run to export: name, folder or latest [default: the newest run].",
        show_default=False,
    )] = None,
    to: Annotated[Path, typer.Option(help="New folder to write the export to.", show_default=False)] = ...,
    format: Annotated[str, typer.Option(
        help=f"{FORMATS}: LoRA adapters as peft folders; both towers as ONNX graphs or OpenVINO IR (pixels or token "
             "ids in, normalized embedding out, tokenizer and preprocessing beside); the text side as a "
             "sentence-transformers folder.",
    )] = "onnx",
    checkpoint: Checkpoint = "best",
    force: Annotated[bool, typer.Option("--force", help="Replace --to if it exists and is not empty.")] = False,
    runs_dir: RunsDir = None,
) -> None:
    """Write a trained run in a format other programs open without mmret (peft, ONNX Runtime,
    OpenVINO, sentence-transformers), with a model card (README.md)."""
    from mmret.api import load
    from mmret.cli import ui
    from mmret.export.catalog import export_run, get_exporter

    get_exporter(format)  # an unknown format is refused before the run is loaded
    with ui.err_console.status(f"exporting as {format}"):
        result = export_run(load(run, checkpoint=checkpoint, device="cpu", runs_dir=runs_dir), to, format,
                            force=force)
    ui.console.print(f"wrote {result.format} export of {len(result.files)} files to {result.path}", highlight=False)
    for name in result.files:
        ui.console.print(f"  {name}", highlight=False)
