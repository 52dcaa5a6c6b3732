"""`mmret verify`."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from mmret.cli.app import DataDir, RunsDir, app, command
from mmret.errors import MmretError


@app.command()
@command
def verify(
    dataset: Annotated[Optional[list[str]], typer.Option(
        help="Prepared dataset whose feature caches to check (repeat for more).",
        show_default=False,
    )] = None,
    run: Annotated[Optional[list[str]], typer.Option(
        help="Run whose checkpoints and embeddings to check (name, folder or latest; repeat for more).",
        show_default=False,
    )] = None,
    data_dir: DataDir = None,
    runs_dir: RunsDir = None,
) -> None:
    """Check every byte of feature caches, run embeddings and checkpoints against the checksums
    written with them (opening a large cache checks only a sample)."""
    from mmret.cli import ui
    from mmret.runs import resolve_run
    from mmret.verify import verify as run_verify

    if not dataset and not run:
        raise MmretError("nothing to verify: pass --dataset NAME and/or --run RUN")
    checked = run_verify(list(dataset or []), [resolve_run(r, runs_dir) for r in run or []], data_dir,
                         ui.RichReporter())
    rows = [(c.what, c.parts, c.result) for c in checked]
    ui.console.print(ui.table("verify", ["what", "parts", "result"], rows))
    bad = [c for c in checked if not c.ok]
    if bad:
        raise MmretError(f"{len(bad)} damaged: {bad[0].path} ({', '.join(bad[0].damaged[:3])}); {bad[0].fix}")
