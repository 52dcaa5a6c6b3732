"""Where datasets and runs live, the names allowed for them, and the one guard every file of a
dataset or gallery is opened through.

`data/<ds>/` and `runs/<run>/` sit in the working directory unless an option or an environment
variable moves them. A dataset or run name is one path component of letters, digits, '-', '_'
and '.', so that a name from an option can never reach outside its root.

`Roots` is where a dataset's files may lie. `Roots.open` resolves the real path (symbolic links
included) and refuses anything outside the roots before opening it, opens that real path with
O_NOFOLLOW (a link put in place of the last component since is refused), then checks the real path
of the descriptor it got (`/proc/self/fd`): a folder swapped for a link between the check and the
open is caught, because what is checked is what was opened, and the bytes are read from that
descriptor only. It also refuses what is not a regular file (a FIFO would block, `/dev/zero` never
ends), opened non-blocking so that even a FIFO is never waited on. Where the system has no
`/proc/self/fd`, the descriptor's device and inode are compared with the real path's instead.
A hard link cannot be told from the file it links to; creating one to another user's file needs
that file's ownership on Linux (`fs.protected_hardlinks`).
"""

from __future__ import annotations

import errno
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

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
    if name and not name.strip("."):
        raise MmretError(f"{option} {name!r} is only dots, which name a folder and its parent; give a name with a "
                         "letter or digit in it")
    if not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise MmretError(f"{option} {name!r} may hold only letters, digits, '-', '_' and '.'")
    if name in reserved:
        raise MmretError(f"{option} {name!r} is reserved (runs/{name} links to the newest run); pick another name")
    return name


def slug(text: str, limit: int = 40) -> str:
    """A short lower-case file-name form of a model name or path (its last component)."""
    return re.sub(r"[^a-z0-9.]+", "-", text.rstrip("/").split("/")[-1].lower()).strip("-")[:limit] or "model"


def within(path: str | Path, root: str | Path) -> bool:
    """Whether `path` lies inside `root`, by the names alone (`..` resolved, symbolic links not
    followed: `Roots` follows them)."""
    path, root = _absolute(path), _absolute(root)
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def plain(path: str) -> bool:
    """Whether an absolute name is normal already (no `.`, `..` or empty part, no trailing `/`), so
    `os.path.abspath` would return it unchanged: tables of 100,000 items are checked one name at a
    time, and abspath is most of that time."""
    return (path.startswith("/") and "//" not in path and "/./" not in path and "/../" not in path
            and not path.endswith(("/", "/.", "/..")))


def _absolute(path: str | Path) -> str:
    path = os.fspath(path)
    return path if plain(path) else os.path.abspath(path)


class UnsafePath(MmretError):
    """A file that may not be read: outside its dataset's roots, or not a regular file. `reason`
    says why without naming the file (for messages that name it already)."""

    def __init__(self, path: str | Path, reason: str):
        super().__init__(f"{path} {reason}")
        self.path, self.reason = str(path), reason


_FLAGS = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)


@dataclass(frozen=True)
class Roots:
    """The folders (real paths) a dataset's files may lie in; `anywhere` for a dataset prepared
    with --allow-outside-root and for files the user names themselves (a query picture), which
    are still refused when they are no regular file. Picklable: DataLoader workers carry it."""

    folders: tuple[str, ...] = ()
    anywhere: bool = False

    @classmethod
    def of(cls, *folders: str | Path | None, anywhere: bool = False) -> "Roots":
        return cls(tuple(dict.fromkeys(os.path.realpath(f) for f in folders if f)), anywhere)

    def __str__(self) -> str:
        return "anywhere" if self.anywhere else " or ".join(self.folders)

    def holds(self, real: str) -> bool:
        return self.anywhere or any(within(real, folder) for folder in self.folders)

    def check(self, path: str | Path) -> str:
        """The real path of `path` if it lies inside the roots, else `UnsafePath` (nothing opened)."""
        real = os.path.realpath(path)
        if not self.folders and not self.anywhere:  # a reader nobody told where it may read
            raise UnsafePath(path, "may not be read: no folder was given to read from")
        if not self.holds(real):
            raise UnsafePath(path, f"resolves to {real}, outside {self}" if real != os.path.abspath(path)
                             else f"is outside {self}")
        return real

    def open(self, path: str | Path) -> BinaryIO:
        """`path` opened for reading, if it is a regular file inside the roots (see the module docstring)."""
        real = self.check(path)
        try:
            fd = os.open(real, _FLAGS)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise UnsafePath(path, "was replaced by a symbolic link while it was opened") from None
            raise
        try:
            self._check_descriptor(fd, path, real)
        except BaseException:
            os.close(fd)
            raise
        return open(path, "rb", opener=lambda *_: fd)  # the file object takes the descriptor, named by the path

    def _check_descriptor(self, fd: int, path: str | Path, real: str) -> None:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = ("a folder" if stat.S_ISDIR(st.st_mode) else "a pipe (FIFO)" if stat.S_ISFIFO(st.st_mode) else
                    "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else "a socket")
            raise UnsafePath(path, f"is {kind}, not a regular file")
        try:
            opened = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # no /proc: the file at the real path must be the one opened
            there = os.stat(real)
            if (there.st_dev, there.st_ino) != (st.st_dev, st.st_ino):
                raise UnsafePath(path, "changed while it was opened") from None
            return
        if not self.holds(opened):
            raise UnsafePath(path, f"resolves to {opened}, outside {self}")

    def read_bytes(self, path: str | Path) -> bytes:
        with self.open(path) as f:
            return f.read()


ANYWHERE = Roots(anywhere=True)
