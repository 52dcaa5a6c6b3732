"""`mmret quickstart`."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from mmret.cli import show
from mmret.cli.app import DataDir, RunsDir, app, command

# ---------------------------------------------------------------------------- quickstart


@app.command()
@command
def quickstart(
    epochs: Annotated[Optional[int], typer.Option(help="Training epochs [default: 15].", show_default=False)] = None,
    data_dir: DataDir = None,
    runs_dir: RunsDir = None,
) -> None:
    """The whole pipeline offline on the built-in example: prepare, train a small scratch model,
    evaluate it on held-out pictures, and search with a caption (about a minute on a 2-core CPU)."""
    from mmret.cli import ui
    from mmret.quickstart import quickstart as run_quickstart

    result = run_quickstart(data_dir, runs_dir, epochs, ui.RichReporter())
    show.show_prepare(result.prepared)
    show.show_train(result.trained)
    show.show_eval([result.evaluated], "table")
    show.show_search(result.searched, None)
    ui.console.print(f"quick start done in {result.seconds:.0f}s; the run is {result.trained.run_dir.name} "
                     f"(try `mmret search \"a green triangle left of a purple square\"`)", highlight=False)
