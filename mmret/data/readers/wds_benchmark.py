"""CLIP_benchmark's webdataset sets (its `wds/<name>` datasets), read as its
`datasets.builder.build_wds_dataset` reads them, and `mmret prepare wds`, which takes either such
a folder or a pattern of img2dataset shards (`mmret.data.readers.wds`).

The folder is what CLIP_benchmark's `webdataset_builder.convert_dataset` and
`convert_retrieval_dataset` (`clip_benchmark_export_wds`) write:

    root/dataset_type.txt       "retrieval"; none: classification ("multilabel" is not read)
    root/classnames.txt         classification: one class name per line, a label is its line's index
    root/zeroshot_classification_templates.txt   classification, optional: prompt templates with {c}
    root/<split>/nshards.txt    N, the number of shards: <split>/0.tar ... <split>/N-1.tar

A retrieval sample is a picture (webp, png, jpg or jpeg) and a `txt` of its captions, one per
line; all are kept, in order, so image→text counts a hit when any of them ranks in the top k (the
protocol of CLIP_benchmark and the papers). A classification sample is a picture and a `cls` (its
class's index); its label and its caption are the class name (as with `prepare classes`), and
dataset.json keeps the class names in CLIP_benchmark's order and the templates, which `eval --task
classification` then uses, as CLIP_benchmark does: every class competes (one without items too),
prompts name each class exactly as classnames.txt does, and the set's templates are the default.

The split folders become mmret's splits (train, val, test; any other is reported and left out). A
set with train but no val folder holds out `--val` of train as val (seeded, stratified by class);
test is exactly the set's test. Items are read in place (`<split>/<n>.tar::<key>.<ext>`, relative
to the root) by the shard machinery of `readers.wds`. A shard that is missing or is no readable
tar stops the prepare with one line: a benchmark read in part is no longer the benchmark.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

from mmret.common.items import MemberError, member_address, shard_index
from mmret.common.paths import Roots
from mmret.data.readers.base import SPLITS, ItemRecord, Problem, SourceData
from mmret.data.readers.registry import register_reader
from mmret.data.readers.wds import MAX_SHARDS, duplicate_key, read_samples, read_wds
from mmret.errors import MmretError, printable

TYPE_FILE, CLASSES_FILE, TEMPLATES_FILE = "dataset_type.txt", "classnames.txt", "zeroshot_classification_templates.txt"


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise MmretError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None


def split_folders(root: Path) -> list[Path]:
    """The sub-folders that hold shards (or say how many they hold)."""
    return sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")
                  and ((d / "nshards.txt").is_file() or any(d.glob("*.tar"))))


def is_benchmark_folder(root: Path) -> bool:
    return any((root / name).is_file() for name in (TYPE_FILE, CLASSES_FILE)) or bool(split_folders(root))


def dataset_type(root: Path) -> str:
    """retrieval or classification (CLIP_benchmark's default when dataset_type.txt is missing)."""
    path = root / TYPE_FILE
    kind = _read_text(path).strip().lower() if path.is_file() else "classification"
    if kind == "multilabel":
        raise MmretError(f"{path} says multilabel: multi-label sets (.npy labels) are not read; prepare a "
                         "retrieval or single-label classification set")
    if kind not in ("retrieval", "classification"):
        raise MmretError(f"{path} must say retrieval or classification (CLIP_benchmark's types), got {kind[:40]!r}")
    return kind


def class_names(root: Path) -> list[str]:
    """classnames.txt's lines (the index of a line is the label `cls` holds); trailing blanks dropped."""
    path = root / CLASSES_FILE
    if not path.is_file():
        raise MmretError(f"{root} is a CLIP_benchmark classification set (no {TYPE_FILE} saying retrieval) without "
                         f"{CLASSES_FILE}: add it, one class name per line in label order")
    names = [line.strip() for line in _read_text(path).splitlines()]
    while names and not names[-1]:
        names.pop()
    if "" in names:
        raise MmretError(f"{path} line {names.index('') + 1} is empty; every line names the class of that label")
    if len(names) < 2:
        raise MmretError(f"classification needs at least two classes, {path} names {len(names)}")
    return names


def class_labels(names: list[str]) -> list[str]:
    """One label per class: its name, and for a name that two classes share, the name and index."""
    counts = Counter(names)
    return [name if counts[name] == 1 else f"{name} ({i})" for i, name in enumerate(names)]


def templates(root: Path) -> list[str]:
    """The set's prompt templates, one per non-blank line (checked when `eval` fills them in)."""
    path = root / TEMPLATES_FILE
    return [line.strip() for line in _read_text(path).splitlines() if line.strip()] if path.is_file() else []


def shards(folder: Path, roots: Roots) -> list[str]:
    """The split's shards as nshards.txt counts them, each a readable tar inside `roots`. The count is
    checked against the shards the folder holds before any list of that length is built."""
    count = folder / "nshards.txt"
    if not count.is_file():
        raise MmretError(f"{count} is missing: CLIP_benchmark reads how many shards {folder.name}/ holds from it "
                         f"(write the number, e.g. `ls {folder}/*.tar | wc -l > {count}`)")
    text = _read_text(count).strip()
    if not text.isdigit() or len(text) > 12 or int(text) < 1:
        raise MmretError(f"{count} must hold the number of shards (a whole number, at least 1), got "
                         f"{printable(text[:20])!r}")
    if int(text) > MAX_SHARDS:
        present = sum(1 for e in os.scandir(folder) if e.name.endswith(".tar") and e.name[:-4].isdigit())
        raise MmretError(f"{count} says {int(text):,} shards, more than the {MAX_SHARDS:,} mmret reads from one "
                         f"split, and {folder} holds {present:,} numbered .tar files; correct nshards.txt")
    urls = [str(folder / f"{i}.tar") for i in range(int(text))]
    missing = [u for u in urls if not Path(u).is_file()]
    if missing:
        raise MmretError(f"{count} says {len(urls)} shards but {len(missing)} are missing (first: {missing[0]}); "
                         "copy them, or correct nshards.txt")
    for url in urls:
        try:
            shard_index(url, roots)
        except MemberError as e:
            raise MmretError(f"{e}; write the shard again, or remove it and correct {folder.name}/nshards.txt") from None
    return urls


def _record(s: dict, split: str, names: list[str] | None, labels: list[str] | None,
            problems: list[Problem]) -> ItemRecord | None:
    if names is None:
        captions, label = s.get("captions"), None
    elif "label" in s and s["label"] < len(names):
        captions, label = [names[s["label"]]], labels[s["label"]]
    else:
        if "label" in s:
            problems.append(Problem("bad label", f"{s['url']}::{s['member']}",
                                    f"cls {s['label']} but {CLASSES_FILE} names {len(names)} classes; left out"))
        return None
    if not captions:
        return None
    address = member_address(f"{split}/{Path(s['url']).name}", s["member"])  # relative to the root
    return ItemRecord(f"{split}/{s['key']}", address, captions, split=split, label=label, columns=s["columns"])


def read_benchmark(root: Path, cfg) -> SourceData:
    from mmret.common.device import default_workers

    import torch

    kind = dataset_type(root)
    names = class_names(root) if kind == "classification" else None
    labels = class_labels(names) if names else None
    problems: list[Problem] = []
    splits: dict[str, list[str]] = {}
    for folder in split_folders(root):
        if folder.name in SPLITS:
            splits[folder.name] = shards(folder, Roots.of(root))
        else:
            problems.append(Problem("other split", f"{folder.name}/", "not train, val or test; left out"))
    if not splits:
        raise MmretError(f"{root} holds no train, val or test folder of CLIP_benchmark shards (test/nshards.txt "
                         "beside test/0.tar, ...)")
    urls = [u for split_urls in splits.values() for u in split_urls]
    records, seen, kinds = [], {}, set()
    for s in read_samples(urls, cfg.check_items, default_workers(torch.device("cpu")), labels=names is not None):
        problems += [Problem(**p) for p in s["problems"]]
        split = Path(s["url"]).parent.name
        rec = _record(s, split, names, labels, problems) if "columns" in s else None
        if rec is None:
            continue
        if rec.item_id in seen:
            problems.append(Problem("duplicate key", f"{s['url']}::{s['member']}", duplicate_key(seen[rec.item_id],
                                                                                                 s["url"])))
            continue
        seen[rec.item_id] = s["url"]
        kinds.add(s["modality"])
        records.append(rec)
    carve = "train" in splits and "val" not in splits and cfg.val > 0
    note = "CLIP_benchmark's split folders: " + ", ".join(f"{k} ({len(v)} shards)" for k, v in splits.items())
    if carve:
        for rec in records:
            rec.split = None if rec.split == "train" else rec.split
        note += f"; val: {cfg.val:g} of train, seeded (seed {cfg.seed}){', by class' if names else ''}"
    if len(kinds) > 1:
        raise MmretError(f"the shards hold {' and '.join(sorted(kinds))} items; prepare each kind from shards of its own")
    info: dict = {"clip_benchmark": {"dataset_type": kind, "shards": {k: len(v) for k, v in splits.items()}}}
    if names:
        info.update(classnames=names, class_labels=labels, templates=templates(root))
    files = [str(root / f) for f in (TYPE_FILE, CLASSES_FILE, TEMPLATES_FILE) if (root / f).is_file()]
    return SourceData(records, files + [f"{k}: {len(v)} shards" for k, v in splits.items()], note,
                      split_sizes=(cfg.val, 0.0) if carve else None, problems=problems,
                      modality=kinds.pop() if kinds else "image", item_root=str(root), info=info)


@register_reader("wds", pattern_root=True)
def read_wds_source(root: Path, cfg) -> SourceData:
    """A CLIP_benchmark folder (`--root DIR`) or img2dataset shards (`--root 'shards/{0..9}.tar'`)."""
    if not Path(root).is_dir():
        return read_wds(root, cfg)
    if not is_benchmark_folder(root):
        raise MmretError(f"--root {root} is a folder but no CLIP_benchmark webdataset (dataset_type.txt, "
                         f"test/nshards.txt, test/0.tar, ...); for img2dataset shards give a pattern such as "
                         f"'{root}/{{00000..00099}}.tar'")
    return read_benchmark(root, cfg)
