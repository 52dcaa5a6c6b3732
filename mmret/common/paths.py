"""Where datasets and runs live, and the names allowed for them.

`data/<ds>/` and `runs/<run>/` sit in the working directory unless an option or an environment
variable moves them. A dataset or run name is one path component of letters, digits, '-', '_'
and '.', so that a name from an option can never reach outside its root.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from mmret.errors import MmretError

DATA_DIR_ENV = "MMRET_DATA_DIR"
RUNS_DIR_ENV = "MMRET_RUNS_DIR"


def data_root(override: str | Path | None = None) -> Path:
    """The folder holding `data/<ds>/`: the option, else $MMRET_DATA_DIR, else ./data."""
    return Path(override or os.environ.get(DATA_DIR_ENV) or "data").expanduser().absolute()


def runs_root(override: str | Path | None = None) -> Path:
    """The folder holding `runs/<run>/`: the option, else $MMRET_RUNS_DIR, else ./runs."""
    return Path(override or os.environ.get(RUNS_DIR_ENV) or "runs").expanduser().absolute()


def check_name(option: str, name: str, reserved: tuple[str, ...] = ()) -> str:
    """`name` if it may name a folder under a root (letters, digits, '-', '_', '.'; not only dots;
    not a `reserved` name), else a one-line error. Every command that takes a name checks it here."""
    if not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise MmretError(f"{option} {name!r} may hold only letters, digits, '-', '_' and '.'")
    if name in reserved:
        raise MmretError(f"{option} {name!r} is reserved (runs/{name} links to the newest run); pick another name")
    return name


def slug(text: str, limit: int = 40) -> str:
    """A short lower-case file-name form of a model name or path (its last component)."""
    return re.sub(r"[^a-z0-9.]+", "-", text.rstrip("/").split("/")[-1].lower()).strip("-")[:limit] or "model"


def within(path: str | Path, root: str | Path) -> bool:
    """Whether `path` lies inside `root`, by the names alone (`..` resolved, symbolic links kept: a
    link the user placed in their own folder is theirs to follow)."""
    path, root = os.path.abspath(path), os.path.abspath(root)
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)
