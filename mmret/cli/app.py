"""The Typer app every command registers on, the one-line error handling, and the options
several commands share."""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer

from mmret.common.options import settings_of
from mmret.common.version import __version__
from mmret.errors import MmretError, explain, printable
from mmret.runs.config import ITEM_FLAGS, EncoderConfig

app = typer.Typer(
    name="mmret",
    help="Image-text and audio-text retrieval you can train on one consumer GPU or a laptop CPU.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
    rich_markup_mode=None,
)

DEBUG_ENV = "MMRET_DEBUG"

DataDir = Annotated[Optional[Path], typer.Option(
    "--data-dir", envvar="MMRET_DATA_DIR", show_envvar=True,
    help="Folder holding the prepared datasets (default: ./data).")]
RunsDir = Annotated[Optional[Path], typer.Option(
    "--runs-dir", envvar="MMRET_RUNS_DIR", show_envvar=True, help="Folder holding the runs (default: ./runs).")]
Device = Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")]
Checkpoint = Annotated[str, typer.Option(help="Which checkpoint: best or last.")]
# the item tower is one setting (`item`), spelled the way a dataset's items are named (see EncoderConfig)
ITEM_TOWER = next(s.flags for s in settings_of(EncoderConfig) if s.name == "item")


def item_tower(help: str) -> Any:
    """The item tower option with `help` after the words every command shares."""
    return typer.Option(*ITEM_TOWER, help=f"Frozen item tower (pictures: --vision, sounds: --audio): {help}",
                        show_default=False)


def flag(setting: str, modality: str | None = None) -> str:
    """How a command line names `setting` (the item tower after the items' modality, when known)."""
    if setting == "item":
        return ITEM_FLAGS.get(modality or "", ITEM_TOWER[0])
    return "--" + setting.replace("_", "-")


def debug() -> bool:
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def command(fn: Callable) -> Callable:
    """Turn any failure into one red line and exit code 1 (`MmretError`s say what to do; others are
    explained by `mmret.errors.explain`); a traceback only with MMRET_DEBUG=1."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from mmret.cli import ui

        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except KeyboardInterrupt:
            if debug():
                raise
            ui.print_error("interrupted")
            raise typer.Exit(130) from None
        except Exception as e:  # noqa: BLE001 - every failure ends in one line
            if debug():
                raise
            ui.print_error(explain(e))
            raise typer.Exit(getattr(e, "exit_code", 1)) from None

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
    """Image-text and audio-text retrieval you can train on one consumer GPU or a laptop CPU."""
    root = logging.getLogger()
    if not any(isinstance(h, _StderrHandler) for h in root.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s" if debug() else
                                               "%(levelname)s: %(message)s"))
        root.addHandler(handler)
    root.setLevel(logging.DEBUG if debug() else logging.WARNING)
    if not debug():  # torchao (the int8 extra) built for another torch release logs deprecation notes on import
        logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)


class _StderrHandler(logging.StreamHandler):
    """Log lines to whatever `sys.stderr` is now (a test runner swaps it per command), their control
    characters escaped (a log line may quote a file's content)."""

    def __init__(self) -> None:
        super().__init__()

    def format(self, record: logging.LogRecord) -> str:
        return "\n".join(printable(line) for line in super().format(record).split("\n"))

    @property
    def stream(self):
        import sys

        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def run_or_zero_shot(*, run, zero_shot, dataset, data_dir, runs_dir) -> Path:
    """The run folder named by --run, or the one standing for --zero-shot MODEL on --dataset."""
    from mmret.runs import load_run_config, resolve_run

    if zero_shot:
        from mmret.inference.zeroshot import zero_shot_run

        if dataset is None:
            dataset = load_run_config(resolve_run(run, runs_dir)).data.dataset if run else None
        if dataset is None:
            raise MmretError("--zero-shot needs --dataset: the prepared dataset to evaluate on")
        return zero_shot_run(zero_shot, dataset, data_dir, runs_dir)
    return resolve_run(run, runs_dir)


def check_writable(path: Path, option: str) -> None:
    """Fail before any work when `path` cannot be written (a folder, or a folder one cannot write in)."""
    import tempfile

    if path.is_dir():
        raise MmretError(f"{option} {path} is a folder; give a file name (e.g. {path / 'results.png'})")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=".mmret-check-"):
            pass
    except OSError as e:
        raise MmretError(f"{option} {path}: cannot write there ({e.strerror}); give a path in a folder you may "
                         "write to") from None
