"""Atomic file writes, and reads that name the file when it is damaged.

Every file is written under a temporary name in its folder, then renamed: a reader sees either the
old file or the whole new one, never half of it, and an interrupted write leaves the previous state
untouched. A file that cannot be decoded (truncated, overwritten, not what it should be) is a
`DamagedFile` naming it and saying what to do, never a decoder's traceback.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from mmret.errors import MmretError

REMAKE = "write it again with the command that made it"


class DamagedFile(MmretError, ValueError):
    """A file mmret wrote (or was given) that cannot be decoded; `path` names it."""

    def __init__(self, message: str, path: str | Path | None = None):
        super().__init__(message)
        self.path = path


def damaged(path: str | Path, what: str, fix: str = REMAKE) -> DamagedFile:
    return DamagedFile(f"{path} is damaged ({what}); {fix}", path)


def _umask() -> int:
    """The process's umask (reading it means setting it: put straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


UMASK = _umask()  # read once, at import: os.umask is process-wide, and threads write files too


def as_created(path: Path, folder: bool = False) -> None:
    """Give a file (or `folder`) made under a temporary name the mode `open()` (`mkdir`) would have
    given it: 0666 (0777) less the umask. tempfile makes them 0600 (0700), which left results that
    other users of a machine could not read."""
    os.chmod(path, (0o777 if folder else 0o666) & ~UMASK)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path` (with the mode a new file
    gets under the umask), on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        if tmp.exists():  # the writer may have replaced the file in its own way; it is the one moved
            as_created(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json(path: str | Path, data: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")


def read_json(path: str | Path, fix: str = REMAKE) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise damaged(path, f"not valid JSON: {e}", fix) from None


def read_parquet(path: str | Path, fix: str = REMAKE):
    """A parquet table as a DataFrame; a truncated or foreign file is a `DamagedFile`."""
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(2, "No such file or directory", str(path))
    try:
        return pd.read_parquet(path)
    except Exception as e:  # pyarrow raises its own types (ArrowInvalid, ArrowIOError) for a damaged file
        raise damaged(path, f"not a readable parquet table: {str(e).splitlines()[0][:200]}", fix) from None


def load_npy(path: str | Path, fix: str = REMAKE, mmap: bool = True):
    """A .npy array (memory-mapped read-only by default); never unpickles."""
    import numpy as np

    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, EOFError, OSError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise damaged(path, f"not a readable .npy array: {str(e).splitlines()[0][:200]}", fix) from None


def write_parquet(path: str | Path, frame) -> None:
    with atomic_path(path) as tmp:
        frame.to_parquet(tmp, index=False)


@contextmanager
def atomic_dir(path: str | Path, replace: bool = False) -> Iterator[Path]:
    """Build a whole folder under a temporary name, then move it into place in one rename.

    With `replace`, an existing folder at `path` is swapped out only after the new one is complete.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        as_created(tmp, folder=True)
        if path.exists() and replace:
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / "x")
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def config_dict(cfg: Any) -> dict:
    """A JSON-ready dict of a config dataclass (paths become strings)."""
    import dataclasses

    return {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(cfg).items()}


def ensure_free_space(folder: str | Path, nbytes: int, what: str, margin: int = 64 * 2**20) -> None:
    """Stop with one line before writing `nbytes` into `folder` when its disk has less free."""
    folder = Path(folder)
    probe = folder if folder.exists() else next((p for p in folder.parents if p.exists()), Path("/"))
    free = shutil.disk_usage(probe).free
    if free < nbytes + margin:
        raise MmretError(f"{what} needs {_size(nbytes)} in {folder}, and {_size(margin)} to spare, but its disk has "
                         f"{_size(free)} free; free some space or point --data-dir / --runs-dir at a larger disk")


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GB" if n >= 2**30 else f"{n / 2**20:.1f} MB"


def reserve(path: str | Path) -> None:
    """Claim the disk blocks of a (sparse) file now, so writing through a memory map later cannot
    run out of space (which the kernel reports as SIGBUS, killing the process without a word)."""
    with open(path, "r+b") as f:
        size = os.fstat(f.fileno()).st_size
        if size and hasattr(os, "posix_fallocate"):
            try:
                os.posix_fallocate(f.fileno(), 0, size)
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # a file system without it: best effort
                    raise


@contextmanager
def uninterrupted() -> Iterator[None]:
    """Hold SIGTERM and SIGINT until the block ends, so files written together (a checkpoint's
    weights and its optimizer state) are never left one new and one old by a launcher stopping the
    process; a signal that came in the meantime is delivered at the end. Outside the main thread
    (where Python cannot handle signals) the block just runs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    handlers = {sig: signal.signal(sig, lambda s, _: caught.append(s)) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        for sig in caught[:1]:
            signal.raise_signal(sig)
