"""Clotho (v1 and v2.1): `clotho_captions_{development,validation,evaluation}.csv`, each with a
header `file_name,caption_1,...,caption_5` (captions quoted when they hold commas), the audio in
the matching folders `development/`, `validation/` and `evaluation/` (or `clotho_audio_*`).

Splits are Clotho's own, as DCASE uses them: development is train, validation is val,
evaluation is test. A sound listed in a table but not on disk is reported and left out.
"""

from __future__ import annotations

import csv
from pathlib import Path

from mmret.data.readers.base import ItemRecord, Problem, SourceData, decode_text, find_file, index_files
from mmret.data.readers.registry import register_reader
from mmret.errors import MmretError
from mmret.modalities.audio import AUDIO_EXTENSIONS

TABLES = {"train": "development", "val": "validation", "test": "evaluation"}  # split -> Clotho's name


def pick(paths: list[Path], folder: str) -> Path:
    """Of the files with one name, the one inside the split's folder (`development/`, ...)."""
    return next((p for p in paths if folder in p.parent.name), paths[0])


def read_table(path: Path, split: str, index: dict[str, list[Path]], problems: list[Problem]) -> list[ItemRecord]:
    text = decode_text(path.read_bytes(), path.name, problems)
    if text is None:
        raise MmretError(f"{path} is not a text file")
    rows = list(csv.reader(text.splitlines()))
    header = [h.strip().lower() for h in rows[0]] if rows else []
    if not header or header[0] != "file_name" or not any(h.startswith("caption") for h in header):
        raise MmretError(f"{path.name} is not a Clotho captions table: expected a header file_name,caption_1,... "
                         f"and found {','.join(header[:3]) or 'nothing'}")
    records = []
    for number, row in enumerate(rows[1:], start=2):
        if not row or not row[0].strip():
            continue
        name = row[0].strip()
        if len(row) < 2:
            problems.append(Problem("malformed line", f"{path.name}:{number}", f"no caption for {name!r}", split))
            continue
        found = index.get(name)
        if found is None:
            problems.append(Problem("missing audio", name, f"listed in {path.name} but not found under the root", split))
            continue
        records.append(ItemRecord(Path(name).stem, str(pick(found, TABLES[split])), row[1:], split))
    return records


@register_reader("clotho")
def read_clotho(root: Path, cfg) -> SourceData:
    problems: list[Problem] = []
    tables = {split: find_file(root, (f"clotho_captions_{name}.csv",)) for split, name in TABLES.items()}
    tables = {split: path for split, path in tables.items() if path is not None}
    if not tables:
        raise MmretError(f"no Clotho captions under {root}: expected clotho_captions_development.csv, "
                         "clotho_captions_validation.csv and clotho_captions_evaluation.csv")
    index = index_files(root, AUDIO_EXTENSIONS)
    records = [rec for split, path in tables.items() for rec in read_table(path, split, index, problems)]
    note = "Clotho's own split: " + ", ".join(f"{TABLES[s]} as {s}" for s in tables)
    return SourceData(records, [str(p) for p in tables.values()], note, problems=problems, modality="audio")
