"""Row stamps: what an item or a caption is, as far as its embedding goes, so that a cache can
reuse a row computed before by matching stamps instead of recomputing the whole table.

An item's stamp covers its id, its file's path relative to the dataset, and the file's size and
modification time; a caption's stamp covers its text. A changed, moved or replaced file gets a
new stamp and is computed again (a member of a `.tar` shard is stamped by its shard's size and
modification time: rewriting a shard recomputes all of its members). Size and modification time rather than a hash of the bytes:
reading every byte of a large photo folder on each run would cost minutes, and size + mtime is
what make and rsync trust for the same question (a file rewritten with the same size within the
file system's time resolution would be missed; a copy that resets mtimes is only recomputed).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterable

import numpy as np

from mmret.common.items import split_address
from mmret.common.paths import Roots, UnsafePath

MISSING = "missing"


def _digest(*parts: str) -> str:
    return hashlib.blake2b("\0".join(parts).encode("utf-8", "surrogatepass"), digest_size=8).hexdigest()


def item_stamps(ids: Iterable, paths: Iterable[str], root: str | Path) -> np.ndarray:
    """(N,) stamps of item files as they are now on disk (a missing file has a stamp too, which
    never matches a row that was computed: such rows are NaN and not kept)."""
    base = str(root) + os.sep
    out = []
    for item, path in zip(ids, paths):
        path = str(path)
        member = split_address(path)
        try:
            st = os.stat(member[0] if member else path)
            state = f"{st.st_size}:{st.st_mtime_ns}"
        except OSError:
            state = MISSING
        out.append(_digest(str(item), path[len(base):] if path.startswith(base) else path, state))
    return np.asarray(out, dtype=object)


def content_stamps(paths: Iterable[str], roots: Roots) -> np.ndarray:
    """(N,) digests of item files' bytes: the same picture under another dataset's name, path or
    modification time has the same one (features are lent across datasets by it). Files are read
    through the dataset's `roots`, as every item file is; a file that cannot or may not be read, or
    a member of a `.tar` shard, gets MISSING, which never lends."""
    out = []
    for path in paths:
        path = str(path)
        if split_address(path):
            out.append(MISSING)
            continue
        h = hashlib.blake2b(digest_size=16)
        try:
            with roots.open(path) as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
        except (OSError, UnsafePath):
            out.append(MISSING)
            continue
        out.append(h.hexdigest())
    return np.asarray(out, dtype=object)


def caption_stamps(texts: Iterable[str]) -> np.ndarray:
    """(M,) stamps of captions: the text is all a caption's embedding depends on."""
    return np.asarray([_digest(str(t)) for t in texts], dtype=object)


def match(wanted: np.ndarray, have: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """For each wanted stamp, the row holding it in `have` (or -1), and the wanted rows not found."""
    rows = np.full(len(wanted), -1, dtype=np.int64)
    if have is not None and len(have):
        where = {s: i for i, s in enumerate(have.tolist())}
        rows = np.asarray([where.get(s, -1) for s in wanted.tolist()], dtype=np.int64)
    return rows, np.flatnonzero(rows < 0)
