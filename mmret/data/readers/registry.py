"""The table of dataset readers, and `register_reader`, which refuses a name that is taken.

Only the table lives here: each reader's module registers it when imported, and the package face
(`mmret.data.readers`, above them all) names the built-in ones and imports them on first use.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from mmret.common.registry import Registry, place_of
from mmret.data.readers.base import SourceData

Reader = Callable[[Path, "PrepareConfig"], SourceData]  # noqa: F821  (config imported lazily)

READERS: Registry = Registry("dataset reader")  # name -> reader
HELP: dict[str, str] = {}  # name -> the help of a reader registered from outside mmret (the built-ins' is above)
PATTERN_ROOTS: set[str] = set()  # readers whose --root is a pattern of files (shards), not a folder


def register_reader(name: str, help: str = "", pattern_root: bool = False) -> Callable[[Reader], Reader]:
    """Register `fn(root, cfg) -> SourceData` as `mmret prepare NAME`; `pattern_root`: its --root is a
    pattern of files (shards), not a folder. A taken name raises."""
    def wrap(fn: Reader) -> Reader:
        READERS.add(name, fn, place_of(fn))
        if help:
            HELP[name] = help
        if pattern_root:
            PATTERN_ROOTS.add(name)
        return fn

    return wrap
