"""Flickr30k in the three forms it is distributed in.

- Karpathy's `dataset_flickr30k.json` (`images[].filename/split/sentences[].raw`): its own
  29000 / 1014 / 1000 split.
- CLIP_benchmark's `flickr30k_{train,val,test}_karpathy.txt` (a header, then `image.jpg,caption`;
  captions may hold commas): the same Karpathy split, one file per split.
- Kaggle's `results.csv` (`image_name| comment_number| comment`): no split, so a seeded random
  split of Karpathy's sizes. One row in that file lacks its second separator
  (`2199200615.jpg| 4   A dog runs across the grass .`); it is recovered, not dropped.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from mmret.data.readers.base import ItemRecord, Problem, SourceData, decode_text, find_file, index_images, locate
from mmret.data.readers.registry import register_reader
from mmret.errors import MmretError

KARPATHY_SIZES = (1014, 1000, 31014)  # val, test, of all images in Karpathy's split
_RESULTS_ROW = re.compile(r"^\s*(?P<image>[^|]+?)\s*\|\s*(?P<number>\d+)\s*(?P<sep>\|)?\s?(?P<caption>.*)$")
_TXT_ROW = re.compile(r"^(?P<image>.+?\.(?:jpe?g|png))\s*,(?P<caption>.*)$", re.IGNORECASE)
_SPLIT_NAMES = {"train": "train", "val": "val", "test": "test", "restval": "train"}


def stem_id(filename: str) -> str:
    return Path(filename).stem


def read_karpathy_json(path: Path, root: Path, id_of=stem_id) -> list[ItemRecord]:
    """Records from a Karpathy split file (Flickr8k, Flickr30k and COCO share the format)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        entries = data["images"]
    except (ValueError, KeyError, TypeError) as e:
        raise MmretError(f"{path} is not a Karpathy split file (expected a JSON object with 'images'): {e}") from None
    index = index_images(root)
    records = []
    for entry in entries:
        name = entry["filename"]
        records.append(ItemRecord(
            item_id=id_of(entry),
            path=locate(name, index, root),
            captions=[s.get("raw", "") for s in entry.get("sentences", [])],
            split=_SPLIT_NAMES.get(entry.get("split", "train"), "train"),
        ))
    return records


def read_results_csv(path: Path, root: Path, problems: list[Problem]) -> list[ItemRecord]:
    text = decode_text(path.read_bytes(), path.name, problems)
    if text is None:
        raise MmretError(f"{path} is not a text file")
    index = index_images(root)
    records = []
    for number, line in enumerate(text.splitlines()[1:], start=2):
        if not line.strip():
            continue
        match = _RESULTS_ROW.match(line)
        if match is None:
            problems.append(Problem("malformed line", f"{path.name}:{number}", f"cannot parse {line[:60]!r}"))
            continue
        if match["sep"] is None:
            problems.append(Problem("recovered line", f"{path.name}:{number}",
                                    "second '|' missing; caption taken after the comment number"))
        name = match["image"]
        records.append(ItemRecord(stem_id(name), locate(name, index, root), [match["caption"]]))
    return records


def read_karpathy_txt(files: dict[str, Path], root: Path, problems: list[Problem]) -> list[ItemRecord]:
    index = index_images(root)
    records = []
    for split, path in files.items():
        text = decode_text(path.read_bytes(), path.name, problems) or ""
        for number, line in enumerate(text.splitlines()[1:], start=2):
            if not line.strip():
                continue
            match = _TXT_ROW.match(line.strip())
            if match is None:
                problems.append(Problem("malformed line", f"{path.name}:{number}", f"cannot parse {line[:60]!r}"))
                continue
            name = match["image"]
            records.append(ItemRecord(stem_id(name), locate(name, index, root), [match["caption"]], split))
    return records


@register_reader("flickr30k")
def read_flickr30k(root: Path, cfg) -> SourceData:
    problems: list[Problem] = []
    karpathy = find_file(root, ("dataset_flickr30k.json",))
    if karpathy:
        records = read_karpathy_json(karpathy, root, id_of=lambda e: stem_id(e["filename"]))
        return SourceData(records, [str(karpathy)], "Karpathy split (dataset_flickr30k.json)", problems=problems)
    txt = {s: find_file(root, (f"flickr30k_{s}_karpathy.txt",)) for s in ("train", "val", "test")}
    txt = {s: p for s, p in txt.items() if p is not None}
    if txt:
        records = read_karpathy_txt(txt, root, problems)
        note = f"Karpathy split (CLIP_benchmark files: {', '.join(txt)})"
        return SourceData(records, [str(p) for p in txt.values()], note, problems=problems)
    results = find_file(root, ("results.csv",))
    if results:
        records = read_results_csv(results, root, problems)
        note = f"seeded random split (seed {cfg.seed}) of Karpathy's sizes: results.csv has no split"
        return SourceData(records, [str(results)], note, split_sizes=KARPATHY_SIZES, problems=problems)
    raise MmretError(
        f"no Flickr30k annotations under {root}: expected dataset_flickr30k.json, "
        "flickr30k_{train,val,test}_karpathy.txt or results.csv"
    )
