"""Any folder of items with captions: pictures or sounds, found by their file endings.

Either a caption file beside each item (`x.jpg` + `x.txt`, `x.ogg` + `x.txt`, one caption per
non-empty line), or one table at the root, `captions.csv`, `captions.jsonl` or `captions.parquet`,
with an `image` (or, for sounds, `audio`) column (path relative to the root) and a `caption`
column, one row per caption; its other columns (a `url`, ...) are kept in the item table as
`source_<column>`, from each item's first row. Pictures are jpg, png, webp, bmp or gif; sounds wav, flac, ogg, opus
or mp3; in any sub-folder. Splits are seeded fractions (`--val`, `--test`). The modality is the
one whose files the folder (or the table's item column) holds.
With `--no-captions` every item file under the root is read and caption files are not looked for.
"""

from __future__ import annotations

import io
import logging
import os
import warnings
from pathlib import Path

from mmret.common.paths import Roots, UnsafePath
from mmret.data.readers.base import ItemRecord, Problem, SourceData, decode_text, read_inside
from mmret.data.readers.registry import register_reader
from mmret.errors import MmretError
from mmret.modalities import MODALITIES, Modality

_logger = logging.getLogger(__name__)

TABLES = ("captions.csv", "captions.jsonl", "captions.parquet")


def read_table(path: Path, problems: list[Problem],
               needed: tuple[str, ...] = ("image", "caption")) -> "pd.DataFrame":  # noqa: F821
    """The captions table; a CSV row whose fields do not match the header is reported and left out
    (never shifted into other columns)."""
    import pandas as pd

    def ragged(fields: list[str]) -> None:
        problems.append(Problem("ragged row", path.name, f"{len(fields)} fields where the header has "
                                f"{len(header)} (quote captions that hold commas): {','.join(fields)[:80]!r}; left out"))

    try:
        data = Roots.of(path.parent).read_bytes(path)
    except UnsafePath as e:
        raise MmretError(f"cannot read {e}") from None
    try:
        with warnings.catch_warnings(record=True) as caught:  # pandas' ParserWarning would print a second line
            warnings.simplefilter("always")
            if path.suffix == ".csv":
                header = pd.read_csv(io.BytesIO(data), nrows=0, encoding_errors="replace").columns
                frame = pd.read_csv(io.BytesIO(data), dtype=str, keep_default_na=False, encoding_errors="replace",
                                    index_col=False, engine="python", on_bad_lines=ragged)
            elif path.suffix == ".jsonl":
                frame = pd.read_json(io.BytesIO(data), lines=True, dtype=False)
            else:
                frame = pd.read_parquet(io.BytesIO(data))
    except Exception as e:
        raise MmretError(f"cannot read {path}: {printable(str(e).splitlines()[0][:200])}") from None
    for w in caught:
        _logger.debug("%s: %s", path.name, w.message)
    if "image" in needed and "image" not in frame.columns and "audio" in frame.columns:
        frame = frame.rename(columns={"audio": "image"})  # a table of sounds names its files `audio`
    if set(needed) - set(frame.columns):
        wanted = " and ".join(f"'{c}'" for c in needed)
        raise MmretError(f"{path.name} needs columns {wanted}; it has {', '.join(map(str, frame.columns))}")
    return frame


def records_from_table(path: Path, root: Path, problems: list[Problem]) -> list[ItemRecord]:
    import pandas as pd

    frame = read_table(path, problems)
    extra = [c for c in frame.columns if c not in ("image", "caption")]  # kept as the item's source fields
    records: dict[str, ItemRecord] = {}
    for row, (name, caption) in enumerate(zip(frame["image"], frame["caption"])):
        name = str(name).strip()
        caption = "" if caption is None or (isinstance(caption, float) and pd.isna(caption)) else str(caption)
        if name not in records:  # an item's first row gives its source fields
            source = {str(c): frame[c].iloc[row] for c in extra} or None
            records[name] = ItemRecord(Path(name).as_posix(), str((root / name).absolute()), [], source=source)
        records[name].captions.append(caption)
    return list(records.values())


def item_files(root: Path) -> tuple[Modality, list[Path]]:
    """Every item file under `root` (sorted walk, hidden folders skipped) and their modality;
    a folder that mixes the files of two modalities is refused."""
    found: dict[str, list[Path]] = {name: [] for name in MODALITIES}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            for modality in MODALITIES.values():
                if modality.is_item_file(name):
                    found[modality.name].append(Path(dirpath) / name)
    kinds = [name for name, files in found.items() if files]
    if len(kinds) > 1:
        raise MmretError(f"{root} holds both {' and '.join(MODALITIES[k].plural for k in kinds)}; prepare each "
                         "kind from a folder of its own")
    modality = MODALITIES[kinds[0] if kinds else "image"]
    return modality, found[modality.name]


def table_modality(records: list[ItemRecord]) -> str:
    """The modality whose files the table names (image when none matches)."""
    for modality in MODALITIES.values():
        if any(modality.is_item_file(Path(r.path).name) for r in records):
            return modality.name
    return "image"


def records_from_sidecars(root: Path, files: list[Path], problems: list[Problem]) -> list[ItemRecord]:
    records = []
    for file in files:
        rel = file.relative_to(root).as_posix()
        sidecar = file.with_suffix(".txt")
        if not sidecar.is_file():
            problems.append(Problem("no caption", rel, f"no caption file {sidecar.name} beside it"))
            continue
        raw = read_inside(root, sidecar, rel, problems)
        if raw is None:
            continue
        text = decode_text(raw, sidecar.relative_to(root).as_posix(), problems)
        captions = [] if text is None else [line for line in text.splitlines() if line.strip()]
        if text is not None and not captions:
            problems.append(Problem("empty caption", rel, f"{sidecar.name} holds no caption"))
            continue
        records.append(ItemRecord(rel, str(file), captions))
    return records


def records_without_captions(root: Path) -> SourceData:
    modality, files = item_files(root)
    if not files:
        endings = ", ".join(e for m in MODALITIES.values() for e in m.extensions)
        raise MmretError(f"no items under {root}: expected files ending in {endings}")
    records = [ItemRecord(f.relative_to(root).as_posix(), str(f), []) for f in files]
    return SourceData(records, [], "", modality=modality.name)


@register_reader("folder")
def read_folder(root: Path, cfg) -> SourceData:
    if not cfg.captions:
        return records_without_captions(root)
    problems: list[Problem] = []
    table = next((root / name for name in TABLES if (root / name).is_file()), None)
    note = f"seeded random split (seed {cfg.seed}): val {cfg.val:g}, test {cfg.test:g} of the items"
    if table is not None:
        records = records_from_table(table, root, problems)
        return SourceData(records, [str(table)], note, split_sizes=(cfg.val, cfg.test), problems=problems,
                          modality=table_modality(records))
    modality, files = item_files(root)
    records = records_from_sidecars(root, files, problems)
    if not records and not problems:
        endings = ", ".join(e for m in MODALITIES.values() for e in m.extensions)
        raise MmretError(f"no captioned pictures or sounds under {root}: expected files ({endings}) "
                         f"with a .txt caption file beside each, or one of {', '.join(TABLES)} "
                         "(or --no-captions for a gallery to search)")
    return SourceData(records, [f"{len(records)} caption files"], note, split_sizes=(cfg.val, cfg.test),
                      problems=problems, modality=modality.name)
