"""SugarCrepe (Hsieh et al. 2023): compositional caption selection over a folder of pictures.

Each category's annotation file, `<category>.json` (add_att, add_obj, replace_att, replace_obj,
replace_rel, swap_att, swap_obj), maps an example id to `{"filename", "caption",
"negative_caption"}`: one picture, its right caption and a wrong one that differs in composition.
That is the format of SugarCrepe's repository (`data/*.json`, over COCO val2017), which
CLIP_benchmark reads too. `--root` is the picture folder the filenames are relative to (COCO's
`val2017/`); the annotation files are looked for there and in its parent, each directly or one
folder down (CLIP_benchmark keeps them beside `val2017/`, SugarCrepe's repository in `data/`). A
filename not found under the root is looked up by its base name anywhere below it.

Every picture is in the test split and carries its right captions (one per example it appears
in), so the same dataset scores retrieval too; each example becomes a caption-selection example
of its category (`candidates.parquet`). When every filename is a COCO val2017 picture the results
carry CLIP_benchmark's dataset names (`sugar_crepe/<category>`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from mmret.common.paths import Roots, UnsafePath
from mmret.data.readers.base import ItemRecord, Problem, Selection, SourceData, find_file, index_images
from mmret.data.readers.registry import register_reader
from mmret.errors import MmretError

CATEGORIES = ("add_att", "add_obj", "replace_att", "replace_obj", "replace_rel", "swap_att", "swap_obj")
COCO_NAME = re.compile(r"\d{12}\.jpg")  # val2017's file names


def annotation_files(root: Path) -> dict[str, Path]:
    """category -> its annotation file, looked for in `root` and its parent (and one folder down)."""
    found: dict[str, Path] = {}
    for base in (root, root.parent):
        for category in CATEGORIES:
            if category not in found:
                path = find_file(base, (f"{category}.json",), depth=1)
                if path is not None:
                    found[category] = path
    return found


def _load(path: Path) -> dict:
    try:
        data = json.loads(Roots.of(path.parent).read_bytes(path).decode("utf-8"))
    except UnsafePath as e:
        raise MmretError(f"cannot read {e}") from None
    except (OSError, ValueError) as e:
        raise MmretError(f"cannot read {path}: {str(e).splitlines()[0][:200]}") from None
    if not isinstance(data, dict):
        raise MmretError(f"{path} is not SugarCrepe's annotation format (an object of examples)")
    return data


@register_reader("sugar-crepe")
def read_sugar_crepe(root: Path, cfg) -> SourceData:
    files = annotation_files(root)
    if not files:
        names = ", ".join(f"{c}.json" for c in CATEGORIES)
        raise MmretError(f"no SugarCrepe annotation files in {root} or {root.parent} (expected any of {names})")
    problems: list[Problem] = []
    index: dict[str, Path] | None = None
    records: dict[str, ItemRecord] = {}
    selections: list[Selection] = []
    for category, path in sorted(files.items()):
        for key, entry in _load(path).items():
            fields = entry if isinstance(entry, dict) else {}
            name, right, wrong = (str(fields.get(k) or "").strip() for k in ("filename", "caption", "negative_caption"))
            if not (name and right and wrong):
                problems.append(Problem("malformed example", f"{path.name}:{key}", "needs filename, caption and "
                                        "negative_caption; left out", "test"))
                continue
            file = root / name
            if not file.is_file():
                index = index_images(root) if index is None else index
                file = index.get(Path(name).name, file)
            item = Path(name).with_suffix("").as_posix()
            record = records.setdefault(item, ItemRecord(item, str(file), [], "test"))
            if right.lower() not in {c.lower() for c in record.captions}:
                record.captions.append(right)
            selections.append(Selection(category, [item], [right, wrong]))
    coco = all(COCO_NAME.fullmatch(Path(r.path).name) for r in records.values())
    return SourceData(list(records.values()), [str(p) for p in files.values()], "every picture in test (SugarCrepe)",
                      problems=problems, info={"selection_benchmark": "sugar_crepe"} if coco else {},
                      selections=selections)
