"""Digests of files: of one file's bytes (a checkpoint), or of a set of files with their names (a
model folder), remembered per (path, size, mtime) within a process so a folder is hashed once."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

_REMEMBERED: dict[tuple, str] = {}


def _update(h: Any, path: Path) -> None:
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)


def file_digest(path: str | Path) -> str:
    """The first 16 hex digits of the sha256 of a file's bytes."""
    h = hashlib.sha256()
    _update(h, Path(path))
    return h.hexdigest()[:16]


def files_digest(paths: list[Path], root: Path | None = None) -> str:
    """`sha256:` and 16 hex digits over the names (relative to `root`) and bytes of `paths`."""
    stamp = tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in paths)
    if stamp not in _REMEMBERED:
        h = hashlib.sha256()
        for p in paths:
            h.update(str(p.relative_to(root) if root else p.name).encode() + b"\0")
            _update(h, p)
        _REMEMBERED[stamp] = "sha256:" + h.hexdigest()[:16]
    return _REMEMBERED[stamp]
