"""AudioCaps: `train.csv`, `val.csv` and `test.csv` with `audiocap_id,youtube_id,start_time,caption`
(one row per caption: one per clip in train, five per clip in val and test), and the clips,
which AudioCaps does not distribute: each user downloads them from YouTube, and most have only
part of them. A clip is found by its YouTube id under the root, in any sub-folder, with any
sound ending, in the names the common download tools write:

    <id>.wav   Y<id>.wav   <id>_<start>.wav   Y<id>_<start>.000_<end>.000.wav (AudioSet's)

A clip that is not on disk is reported once (with its split) and left out: the summary says how
many of each split are missing, and a split with none left is an error only if every split is.
Splits are AudioCaps' own; the item id is `<youtube_id>_<start_time>`.
"""

from __future__ import annotations

import csv
from pathlib import Path

from mmret.data.readers.base import ItemRecord, Problem, SourceData, decode_text, find_file, index_files
from mmret.data.readers.registry import register_reader
from mmret.errors import MmretError
from mmret.modalities.audio import AUDIO_EXTENSIONS

SPLITS = {"train": "train.csv", "val": "val.csv", "test": "test.csv"}
COLUMNS = ("audiocap_id", "youtube_id", "start_time", "caption")


def stems(root: Path) -> dict[str, Path]:
    """Every sound file under `root` by its name without the ending (the first found wins)."""
    return {Path(name).stem: paths[0] for name, paths in index_files(root, AUDIO_EXTENSIONS).items()}


def candidates(youtube_id: str, start: str) -> list[str]:
    """The file names (without ending) a clip goes by in the common download layouts."""
    try:
        s = int(float(start))
    except ValueError:
        s = None
    named = [f"{youtube_id}_{s}", f"Y{youtube_id}_{s}", f"{youtube_id}_{s}.000",
             f"Y{youtube_id}_{s}.000_{s + 10}.000", f"{youtube_id}_{s * 1000}"] if s is not None else []
    return named + [youtube_id, f"Y{youtube_id}"]


def read_split(path: Path, split: str, files: dict[str, Path], problems: list[Problem]) -> list[ItemRecord]:
    text = decode_text(path.read_bytes(), path.name, problems)
    if text is None:
        raise MmretError(f"{path} is not a text file")
    rows = csv.DictReader(text.splitlines())
    missing = set(COLUMNS) - set(rows.fieldnames or ())
    if missing:
        raise MmretError(f"{path.name} is not an AudioCaps table: it lacks {', '.join(sorted(missing))} "
                         f"(expected {','.join(COLUMNS)})")
    records, absent = [], set()
    for number, row in enumerate(rows, start=2):
        youtube_id, start = (row["youtube_id"] or "").strip(), (row["start_time"] or "").strip()
        if not youtube_id:
            problems.append(Problem("malformed line", f"{path.name}:{number}", "no youtube_id", split))
            continue
        clip = f"{youtube_id}_{start}"
        found = next((files[c] for c in candidates(youtube_id, start) if c in files), None)
        if found is None:
            if clip not in absent:
                absent.add(clip)
                problems.append(Problem("missing audio", clip, f"no sound file for YouTube id {youtube_id} "
                                        f"(start {start} s) under the root", split))
            continue
        records.append(ItemRecord(clip, str(found), [row["caption"] or ""], split))
    return records


@register_reader("audiocaps")
def read_audiocaps(root: Path, cfg) -> SourceData:
    problems: list[Problem] = []
    tables = {split: find_file(root, (name,)) for split, name in SPLITS.items()}
    tables = {split: path for split, path in tables.items() if path is not None}
    if not tables:
        raise MmretError(f"no AudioCaps tables under {root}: expected train.csv, val.csv and test.csv "
                         f"with columns {','.join(COLUMNS)}")
    files = stems(root)
    records = [rec for split, path in tables.items() for rec in read_split(path, split, files, problems)]
    note = "AudioCaps' own split (" + ", ".join(tables) + "); clips missing from disk left out"
    return SourceData(records, [str(p) for p in tables.values()], note, problems=problems, modality="audio")
