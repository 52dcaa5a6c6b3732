"""The `mmret` command line: each command parses options, builds a config, calls one library
function and renders its result. No logic lives here.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from typing import Annotated, Callable, Optional

import typer

from mmret import __version__
from mmret.errors import MmretError

app = typer.Typer(
    name="mmret",
    help="Image-text retrieval you can train on one consumer GPU or a laptop CPU.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
    rich_markup_mode=None,
)

DEBUG_ENV = "MMRET_DEBUG"

DataDir = Annotated[Optional[Path], typer.Option(
    "--data-dir", envvar="MMRET_DATA_DIR", show_envvar=True,
    help="Folder holding the prepared datasets (default: ./data).")]


def debug() -> bool:
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def command(fn: Callable) -> Callable:
    """Turn an `MmretError` into one red line and exit code 1 (a traceback with MMRET_DEBUG=1)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from mmret import ui

        try:
            return fn(*args, **kwargs)
        except MmretError as e:
            if debug():
                raise
            ui.print_error(str(e))
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            if debug():
                raise
            ui.print_error("interrupted")
            raise typer.Exit(130) from None

    return wrapper


def _version(value: bool) -> None:
    if value:
        typer.echo(f"mmret {__version__}")
        raise typer.Exit()


@app.callback()
def main_callback(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """Image-text retrieval you can train on one consumer GPU or a laptop CPU."""
    logging.basicConfig(level=logging.DEBUG if debug() else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


# ---------------------------------------------------------------------------- prepare

def _source_help() -> str:
    from mmret.datasets import READER_HELP

    return "Dataset format: " + "; ".join(f"{k} ({v})" for k, v in READER_HELP.items())


@app.command()
@command
def prepare(
    source: Annotated[str, typer.Argument(help=_source_help(), show_default=False)],
    root: Annotated[Optional[Path], typer.Option(help="Folder that holds the raw dataset (not needed for `example`).")] = None,
    name: Annotated[Optional[str], typer.Option(help="Name of the prepared dataset under the data folder (default: SOURCE).")] = None,
    val: Annotated[float, typer.Option(help="Fraction of images for validation when the source has no official split.")] = 0.1,
    test: Annotated[float, typer.Option(help="Fraction of images for testing when the source has no official split.")] = 0.1,
    seed: Annotated[int, typer.Option(help="Seed of the random split (and of the generated example).")] = 0,
    check_images: Annotated[bool, typer.Option("--check-images", help="Decode every image fully and drop broken ones (slower).")] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace the dataset if it was prepared before.")] = False,
    count: Annotated[int, typer.Option(help="Number of pictures in the generated `example` dataset.")] = 500,
    data_dir: DataDir = None,
) -> None:
    """Read a raw dataset and write its image and caption tables with train/val/test splits."""
    from mmret import ui
    from mmret.config import PrepareConfig
    from mmret.datasets import prepare as run_prepare

    cfg = PrepareConfig(source=source, root=root, name=name, val=val, test=test, seed=seed,
                        check_images=check_images, force=force, count=count, data_dir=data_dir)
    result = run_prepare(cfg, ui.RichReporter())
    _show_prepare(result)


def _show_prepare(result) -> None:
    from mmret import ui

    rows = []
    for split, c in result.counts.items():
        per = f"{c['captions'] / c['images']:.2f}" if c["images"] else "-"
        rows.append((split, c["images"], c["captions"], per, c["dropped images"]))
    ui.console.print(ui.table(f"{result.name} ({result.source})", ["split", "images", "captions", "captions/image", "dropped images"], rows))
    ui.console.print(f"splits: {result.split_note}", highlight=False)
    if result.problems:
        ui.console.print("dropped or fixed: " + ", ".join(f"{n} {k}" for k, n in result.dropped.items()), highlight=False)
        for p in result.problems[:5]:
            ui.console.print(f"  {p.kind}: {p.item}: {p.reason}", highlight=False, soft_wrap=True)
        if len(result.problems) > 5:
            ui.console.print(f"  ... all {len(result.problems)} listed in {result.path / 'dataset.json'}", highlight=False)
    ui.console.print(f"wrote {result.path} in {result.seconds:.1f}s", highlight=False)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
