"""What every reader produces and small helpers readers share (the readers' table is
`mmret.data.readers.registry`).

A reader parses one source format into `SourceData`: item records (id, file, captions, the
official split if the source has one), the modality of its items, and the problems it met.
`mmret.data.tables` then turns that into the tables `prepare` writes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from mmret.common.paths import Roots, UnsafePath

SPLITS = ("train", "val", "test")


@dataclass
class ItemRecord:
    """One item (a picture, or a sound for an audio dataset) and its captions."""

    item_id: str
    path: str  # absolute, or relative to the dataset folder for files the dataset owns
    captions: list[str]
    split: str | None = None  # the source's official split, if it has one
    label: str | None = None  # its class, in a dataset for classification (`prepare classes`)
    columns: dict[str, int] | None = None  # table columns a reader already probed (it had the bytes in hand)
    source: dict | None = None  # the source's own fields for it (img2dataset's url, sha256, ...; a table's columns)


@dataclass
class Problem:
    kind: str  # short category shown in the summary, e.g. "missing image"
    item: str  # the file, line or item concerned
    reason: str
    split: str | None = None


@dataclass
class SourceData:
    items: list[ItemRecord]
    files: list[str]  # the annotation files that were read
    split_note: str  # where the splits come from, said in the summary
    # a random split for items without an official one: (val, test) fractions, or counts with the
    # dataset size they were set for (Flickr30k: 1014 and 1000 of 31014), scaled down for smaller sets
    split_sizes: tuple[float, float] | tuple[int, int, int] | None = None
    problems: list[Problem] = field(default_factory=list)
    modality: str = "image"  # what the items are (see mmret.modalities)
    item_root: str | None = None  # the folder item paths are relative to, when not the dataset's (tar shards)
    info: dict = field(default_factory=dict)  # more entries for dataset.json (a CLIP_benchmark set's classnames)


# ---------------------------------------------------------------- helpers for readers


def decode_text(raw: bytes, item: str, problems: list[Problem]) -> str | None:
    """UTF-8 (with or without BOM); else cp1252, reported; else None, reported."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        pass
    try:
        text = raw.decode("cp1252")
    except UnicodeDecodeError:
        problems.append(Problem("caption not UTF-8", item, "undecodable bytes; caption dropped"))
        return None
    problems.append(Problem("caption not UTF-8", item, "read as cp1252 (Windows-1252)"))
    return text


def read_inside(root: Path, path: Path, item: str, problems: list[Problem]) -> bytes | None:
    """The bytes of a file the dataset brings (a caption file beside an item), read only if it really
    lies inside `root` and is a regular file (`mmret.common.paths.Roots`); else None, reported."""
    try:
        return Roots.of(root).read_bytes(path)
    except UnsafePath as e:
        problems.append(Problem("outside root", item, f"{path.name} {e.reason}; not read"))
    except OSError as e:
        problems.append(Problem("unreadable caption", item, f"{path.name}: {e.strerror or e}"))
    return None


def index_images(root: Path) -> dict[str, Path]:
    """Every picture file under `root` by its base name (the first found wins, sorted walk)."""
    from mmret.modalities.image import IMAGE_EXTENSIONS

    found: dict[str, Path] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.lower().endswith(IMAGE_EXTENSIONS):
                found.setdefault(name, Path(dirpath) / name)
    return found


def index_files(root: Path, extensions: tuple[str, ...]) -> dict[str, list[Path]]:
    """Every file under `root` with one of `extensions`, by base name, in a sorted walk (hidden
    folders skipped); a name found in several folders lists each (Clotho's split folders)."""
    found: dict[str, list[Path]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.lower().endswith(extensions):
                found.setdefault(name, []).append(Path(dirpath) / name)
    return found


def find_file(root: Path, names: tuple[str, ...], depth: int = 3) -> Path | None:
    """The first of `names` found in `root` or its sub-folders down to `depth` levels."""
    level = [root]
    for _ in range(depth + 1):
        for folder in level:
            for name in names:
                if (folder / name).is_file():
                    return folder / name
        level = [d for f in level for d in sorted(f.iterdir()) if d.is_dir() and not d.name.startswith(".")]
    return None


def locate(name: str, index: dict[str, Path], root: Path) -> str:
    """Absolute path of an image named in an annotation file; a path under root if not indexed."""
    hit = index.get(Path(name).name)
    return str(hit if hit is not None else root / name)
