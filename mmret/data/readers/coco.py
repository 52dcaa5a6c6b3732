"""MS-COCO captions.

- The official `captions_{train,val}2014.json` (or 2017): `images[]` (id, file_name) and
  `annotations[]` (image_id, caption). Some images have six or seven captions: all are kept.
- Karpathy's `dataset_coco.json` gives the standard 5000-image test and val splits (`restval` goes
  to train). With both, captions come from the official files and splits from Karpathy's.
- Official files alone: train2014 is train; val2014 is split at random (seeded) into val, test
  and the rest to train, with Karpathy's sizes (5000 / 5000), and the summary says so.
"""

from __future__ import annotations

import json
from pathlib import Path

from mmret.data.readers.base import ItemRecord, Problem, SourceData, find_file, index_images, locate
from mmret.data.readers.flickr30k import read_karpathy_json
from mmret.data.readers.registry import register_reader
from mmret.errors import MmretError

OFFICIAL = ("captions_train2014.json", "captions_val2014.json", "captions_train2017.json", "captions_val2017.json")
KARPATHY_COCO_SIZES = (5000, 5000, 40504)  # val and test images, carved out of val2014's 40504


def read_official(path: Path, index: dict[str, Path], root: Path) -> list[ItemRecord]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        images = {img["id"]: img["file_name"] for img in data["images"]}
        annotations = data["annotations"]
    except (ValueError, KeyError, TypeError) as e:
        raise MmretError(f"{path} is not a COCO captions file (expected 'images' and 'annotations'): {e}") from None
    captions: dict[int, list[str]] = {i: [] for i in images}
    for ann in sorted(annotations, key=lambda a: a.get("id", 0)):
        captions.setdefault(ann["image_id"], []).append(ann.get("caption", ""))
    return [ItemRecord(str(i), locate(name, index, root), captions[i]) for i, name in images.items()]


@register_reader("coco")
def read_coco(root: Path, cfg) -> SourceData:
    problems: list[Problem] = []
    karpathy = find_file(root, ("dataset_coco.json",))
    official = [p for p in (find_file(root, (name,)) for name in OFFICIAL) if p is not None]
    if not karpathy and not official:
        raise MmretError(f"no COCO annotations under {root}: expected {', '.join(OFFICIAL[:2])} or dataset_coco.json")
    files = [str(p) for p in ([karpathy] if karpathy else []) + official]
    split_of: dict[str, str] = {}
    karpathy_records: list[ItemRecord] = []
    if karpathy:
        karpathy_records = read_karpathy_json(karpathy, root, id_of=lambda e: str(e.get("cocoid", Path(e["filename"]).stem)))
        split_of = {r.item_id: r.split for r in karpathy_records}
    if not official:
        return SourceData(karpathy_records, files, "Karpathy split (dataset_coco.json)", problems=problems)
    index = index_images(root)
    records: list[ItemRecord] = []
    for path in official:
        part = read_official(path, index, root)
        for rec in part:
            if karpathy:
                rec.split = split_of.get(rec.item_id, "train")
            elif "train" in path.name:
                rec.split = "train"
        records.extend(part)
    if karpathy:
        note = "Karpathy split (dataset_coco.json; restval in train), captions from the official files"
        return SourceData(records, files, note, problems=problems)
    note = f"train2014 as train; val2014 split at random (seed {cfg.seed}) into val/test of Karpathy's sizes"
    return SourceData(records, files, note, split_sizes=KARPATHY_COCO_SIZES, problems=problems)
