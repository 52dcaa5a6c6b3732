"""Winoground (Thrush et al. 2022): two pictures and two captions with the same words in another
order; each caption is right for one picture.

The layout of the dataset's release (facebook/winoground): `examples.jsonl`, one example a line
(`{"id", "caption_0", "caption_1", "image_0", "image_1", "tag", ...}`, `image_k` a picture's name
without its ending), and `images/<name>.png` (any picture ending is taken). `--root` is the folder
holding them (they are also found one or two folders down). Every picture is in the test split with
its caption, so the dataset scores retrieval too; each example becomes one caption-selection example
of 2 pictures x 2 captions (`candidates.parquet`), scored as CLIP_benchmark's `winoground` task.
"""

from __future__ import annotations

import json
from pathlib import Path

from mmret.common.paths import Roots, UnsafePath
from mmret.data.readers.base import ItemRecord, Problem, Selection, SourceData, find_file
from mmret.data.readers.registry import register_reader
from mmret.errors import MmretError


def _picture(folder: Path, name: str) -> Path:
    """The file of picture `name` in `folder` (its ending unknown: png first, as released)."""
    from mmret.modalities.image import IMAGE_EXTENSIONS

    for ending in (".png", *IMAGE_EXTENSIONS):
        if (folder / f"{name}{ending}").is_file():
            return folder / f"{name}{ending}"
    return folder / f"{name}.png"  # missing: reported by the file check


@register_reader("winoground")
def read_winoground(root: Path, cfg) -> SourceData:
    examples = find_file(root, ("examples.jsonl",), depth=2)
    if examples is None:
        raise MmretError(f"no Winoground examples.jsonl under {root} (with the pictures in images/ beside it)")
    folder = examples.parent / "images"
    problems: list[Problem] = []
    records: dict[str, ItemRecord] = {}
    selections: list[Selection] = []
    try:
        lines = Roots.of(examples.parent).read_bytes(examples).decode("utf-8", errors="replace").splitlines()
    except UnsafePath as e:
        raise MmretError(f"cannot read {e}") from None
    except OSError as e:
        raise MmretError(f"cannot read {examples}: {e.strerror or e}") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            example = json.loads(line)
            names = [str(example[f"image_{k}"]) for k in (0, 1)]
            captions = [str(example[f"caption_{k}"]) for k in (0, 1)]
        except (ValueError, KeyError, TypeError):
            problems.append(Problem("malformed line", f"{examples.name}:{number}", "needs image_0, image_1, "
                                    "caption_0 and caption_1; left out", "test"))
            continue
        for name, caption in zip(names, captions):
            record = records.setdefault(name, ItemRecord(name, str(_picture(folder, name)), [], "test"))
            if caption.lower() not in {c.lower() for c in record.captions}:
                record.captions.append(caption)
        selections.append(Selection("winoground", names, captions))
    return SourceData(list(records.values()), [str(examples)], "every picture in test (Winoground)",
                      problems=problems, info={"selection_benchmark": "winoground"}, selections=selections)
