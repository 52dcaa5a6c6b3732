"""Items sorted into classes, for zero-shot classification and linear probes (`mmret eval --task
classification` / `--task linear-probe`).

Either a folder of class subfolders (`root/<class>/.../x.png`: every item file under a top-level
subfolder belongs to that class, at any depth), or one table at the root, `labels.csv`,
`labels.jsonl` or `labels.parquet`, with an `image` column (the file, relative to the root) and a
`label` column, and optionally `caption` and `split` (train, val or test: an official split).

An item's captions (what retrieval training and the retrieval metrics read) are its `caption`
cells, else the lines of an `x.txt` beside it, else its class name: one prepared folder serves
classification and retrieval, with the same splits. Splits the source does not give are seeded
and stratified by class (`--val`, `--test` of every class), so a rare class still reaches test.
"""

from __future__ import annotations

from pathlib import Path

from mmret.data.readers.base import SPLITS, ItemRecord, Problem, SourceData, decode_text, read_inside
from mmret.data.readers.folder import item_files, read_table, table_modality
from mmret.data.readers.registry import register_reader
from mmret.errors import MmretError
from mmret.modalities import MODALITIES

LABEL_TABLES = ("labels.csv", "labels.jsonl", "labels.parquet")


def class_name(label: str) -> str:
    """How prompts and fallback captions name a class: its label with _ and - read as spaces."""
    return " ".join(label.replace("_", " ").replace("-", " ").split())


def _cell(value) -> str:
    return "" if value is None or (isinstance(value, float) and value != value) else str(value).strip()  # nan


def _sidecar_captions(root: Path, item: Path, rel: str, problems: list[Problem]) -> list[str]:
    sidecar = item.with_suffix(".txt")
    if not sidecar.is_file():
        return []
    raw = read_inside(root, sidecar, rel, problems)
    text = None if raw is None else decode_text(raw, rel, problems)
    return [line for line in (text or "").splitlines() if line.strip()]


def _with_captions(root: Path, records: list[ItemRecord], problems: list[Problem]) -> list[ItemRecord]:
    """Records without captions of their own take their sidecar's lines, else their class name."""
    for rec in records:
        if not rec.captions:
            rec.captions = _sidecar_captions(root, Path(rec.path), rec.item_id, problems) or [class_name(rec.label)]
    return records


def _from_folders(root: Path, problems: list[Problem]) -> tuple[list[ItemRecord], str]:
    modality, files = item_files(root)
    records, filled = [], set()
    for item in files:
        rel = item.relative_to(root).as_posix()
        if "/" not in rel:
            problems.append(Problem("no class", rel, "not inside a class folder; left out"))
            continue
        label = rel.split("/", 1)[0]
        filled.add(label)
        records.append(ItemRecord(rel, str(item), [], label=label))
    for folder in sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")):
        if folder.name not in filled:
            problems.append(Problem("empty class", folder.name, f"holds no {modality.plural}; left out"))
    return records, modality.name


def _split_of(value, path: Path, row: int) -> str | None:
    split = _cell(value).lower()
    if split and split not in SPLITS:
        raise MmretError(f"{path.name} row {row}: split must be train, val or test (or empty), got {split!r}")
    return split or None


def _from_table(path: Path, root: Path, problems: list[Problem]) -> tuple[list[ItemRecord], str]:
    frame = read_table(path, problems, needed=("image", "label"))
    captions = frame["caption"] if "caption" in frame.columns else [None] * len(frame)
    splits = frame["split"] if "split" in frame.columns else [None] * len(frame)
    records: dict[str, ItemRecord] = {}
    conflicts: dict[str, set[str]] = {}
    for row, (name, label, caption, split) in enumerate(zip(frame["image"], frame["label"], captions, splits), 2):
        name, label = _cell(name), _cell(label)
        if not name:
            problems.append(Problem("no file", f"row {row}", "empty image cell; left out"))
            continue
        name = Path(name).as_posix()
        if not label:
            problems.append(Problem("no label", name, f"row {row} has an empty label; left out"))
            continue
        rec = records.setdefault(name, ItemRecord(name, str((root / name).absolute()), [], label=label))
        if rec.label != label:
            conflicts.setdefault(name, {rec.label}).add(label)
        rec.split = rec.split or _split_of(split, path, row)
        if _cell(caption):
            rec.captions.append(_cell(caption))
    for name, labels in conflicts.items():
        problems.append(Problem("conflicting labels", name, f"labelled {' and '.join(sorted(labels))}; left out"))
    records = {k: v for k, v in records.items() if k not in conflicts}
    return list(records.values()), table_modality(list(records.values()))


@register_reader("classes")
def read_classes(root: Path, cfg) -> SourceData:
    problems: list[Problem] = []
    table = next((root / name for name in LABEL_TABLES if (root / name).is_file()), None)
    if table is not None:
        records, modality = _from_table(table, root, problems)
        files = [str(table)]
    else:
        records, modality = _from_folders(root, problems)
        files = [f"{len(records)} {MODALITIES[modality].plural} in class folders"]
    labels = sorted({r.label for r in records})
    if len(labels) < 2:
        found = f"only {labels[0]!r}" if labels else "none"
        raise MmretError(f"classification needs at least two classes in {root}, found {found}: put the items in "
                         f"one subfolder per class, or list them in {' or '.join(LABEL_TABLES)} (image, label)")
    note = (f"seeded split stratified by class (seed {cfg.seed}): val {cfg.val:g}, test {cfg.test:g} of each "
            f"of {len(labels)} classes")
    if any(r.split for r in records):
        note = f"official split from {table.name} where given; otherwise " + note
    return SourceData(_with_captions(root, records, problems), files, note, split_sizes=(cfg.val, cfg.test),
                      problems=problems, modality=modality)
