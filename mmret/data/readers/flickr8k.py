"""Flickr8k: `Flickr8k.token.txt` (`name.jpg#0<TAB>caption`) with the official split lists
`Flickr_8k.{train,dev,test}Images.txt` (one file name per line; dev is our val).

Images in the token file but in no split list go to train, and the summary counts them.
"""

from __future__ import annotations

from pathlib import Path

from mmret.data.readers.base import ItemRecord, Problem, SourceData, decode_text, find_file, index_images, locate
from mmret.data.readers.registry import register_reader
from mmret.errors import MmretError

SPLIT_FILES = {"train": "Flickr_8k.trainImages.txt", "val": "Flickr_8k.devImages.txt", "test": "Flickr_8k.testImages.txt"}


def read_lines(path: Path, problems: list[Problem]) -> list[str]:
    text = decode_text(path.read_bytes(), path.name, problems) or ""
    return [line.strip() for line in text.splitlines() if line.strip()]


@register_reader("flickr8k")
def read_flickr8k(root: Path, cfg) -> SourceData:
    problems: list[Problem] = []
    tokens = find_file(root, ("Flickr8k.token.txt",))
    if tokens is None:
        raise MmretError(f"no Flickr8k annotations under {root}: expected Flickr8k.token.txt "
                         "(and Flickr_8k.trainImages.txt, Flickr_8k.devImages.txt, Flickr_8k.testImages.txt)")
    split_of: dict[str, str] = {}
    files = [str(tokens)]
    for split, name in SPLIT_FILES.items():
        path = find_file(root, (name,))
        if path is not None:
            files.append(str(path))
            split_of.update({line: split for line in read_lines(path, problems)})
    index = index_images(root)
    records: list[ItemRecord] = []
    for number, line in enumerate(read_lines(tokens, problems), start=1):
        key, sep, caption = line.partition("\t")
        name = key.rsplit("#", 1)[0]
        if not sep or not name:
            problems.append(Problem("malformed line", f"{tokens.name}:{number}", f"cannot parse {line[:60]!r}"))
            continue
        split = split_of.get(name)
        if split_of and split is None:
            split = "train"
            if not records or records[-1].item_id != Path(name).stem:
                problems.append(Problem("not in a split list", name, "listed in no split file; put in train"))
        records.append(ItemRecord(Path(name).stem, locate(name, index, root), [caption], split))
    if split_of:
        return SourceData(records, files, "official Flickr8k split (train/dev/test lists)", problems=problems)
    note = f"seeded random split (seed {cfg.seed}): no Flickr_8k.*Images.txt lists found"
    return SourceData(records, files, note, split_sizes=(1000, 1000, 8000), problems=problems)
