"""k-fold cross-validated retrieval of training methods on a prepared dataset, and the README report.

For each method and fold: train with `--folds K --fold k` (test = fold k, val = 10% of the rest),
embed the held-out test fold with the best checkpoint, and score it. Prints mean ± std over folds
of text→image and image→text Recall@1/5/10, with chance level beside them, and the training time
per fold. Scores are the usual protocol (a caption's own picture is its one right answer); the
per-fold JSON also holds `same_*` scores where captions of the same text count as one answer.
Sounds work the same way: the table says t2a / a2t and adds DCASE's text→audio mAP@10 (the JSON
keys keep t2i / i2t, "text→item" and "item→text", for any items).

    python benchmarks/crossval.py --dataset tuxpaint \
        --vision ~/.cache/mmret-offline/models/dinov2-small --text ~/.cache/mmret-offline/models/all-minilm-l6-v2

Extra `key=value` arguments set training options for every run (e.g. epochs=40 mixup=0.4).

Seeds instead of folds, for a dataset that comes with its own test set (the relations set: trained
on relations/train, scored on relations/test prepared with `mmret prepare sugar-crepe`):

    python benchmarks/crossval.py --dataset relations-train --seeds 0,1,2,3,4 --test-dataset relations-test \
        --checkpoint last --vision ... --text ... epochs=20 patience=0

trains once per seed on the dataset's own splits and scores the test split of `--test-dataset`;
when that dataset holds caption-selection examples (SugarCrepe's swap_obj, replace_rel, ...) each
run's text_acc per task is scored too (`mmret eval --task caption-selection`) and tabled beside
the recalls, with chance. Every run records the machine's load average (1 min) before and after it.
`--label NAME` names the entry (default: the method) and `--json FILE` adds it to FILE (other
entries kept), so variants of one method run one at a time land in one file. Then

    python benchmarks/crossval.py --report results.json --ceiling ceiling.json \
        --out docs/crossval-openclipart.md --png docs/crossval-openclipart.png

writes the markdown table (and a bar chart) for the README from those files.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from mmret.common.paths import slug
from mmret.data.negatives import caption_keys
from mmret.data.prepared import load_dataset
from mmret.evaluation.selection import evaluate_selection
from mmret.inference.embeddings import write_run_embeddings
from mmret.metrics.retrieval import directions, retrieval_metrics, same_text_metrics
from mmret.modalities import get_modality
from mmret.runs import RunConfig, with_overrides
from mmret.training import train

KS = (1, 5, 10)
PAIRED = ("t2i_r1", "t2i_r10", "i2t_r1", "i2t_r10")
COLS = [f"{d}_r{k}" for d in ("t2i", "i2t") for k in KS]


def label_of(key: str, item: str) -> str:
    """A metric's printed name for these items: t2i_r1 reads t2a R@1 for sounds."""
    t2x, x2t = directions(item)
    direction, _, rest = key.partition("_")
    name = {"t2i": t2x, "i2t": x2t}.get(direction, direction)
    return f"{name} R@{rest[1:]}" if rest.startswith("r") else f"{name} {rest.replace('map', 'mAP@')}"


def parse_value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def run_fold(args, method: str, label: str, fold: int, extra: dict) -> dict:
    """One fold (or, with --seeds, one seed: `fold` is the seed) trained and scored."""
    if args.seeds:
        options = dict(seed=fold, name=f"sd-{args.tag}-{slug(label)}-seed{fold}")
    else:
        options = dict(folds=args.folds, fold=fold, name=f"cv-{args.tag}-{slug(label)}-fold{fold}")
    cfg = with_overrides(RunConfig(), dict(method=method, dataset=args.dataset, item=args.vision, text=args.text,
                                           **options, **extra))
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    result = train(cfg)
    trained = time.perf_counter() - start
    load_after = os.getloadavg()[0]
    emb = write_run_embeddings(result.run_dir, args.test_dataset, split="test", which=args.checkpoint)
    images, captions = (torch.from_numpy(np.asarray(a, dtype=np.float32)) for a in (emb.items, emb.captions))
    modality = get_modality(emb.modality)
    scores = retrieval_metrics(images, captions, emb.caption_item, map_at=modality.map_at).metrics
    keys = torch.from_numpy(caption_keys(emb.caption_table["caption"].tolist()))
    same = same_text_metrics(images, captions, emb.caption_item, keys)
    scores.update({f"same_{k}": v for k, v in same.items()})
    if args.test_dataset and load_dataset(args.test_dataset).candidates is not None:
        chosen = evaluate_selection(result.run_dir, args.test_dataset, which=args.checkpoint)
        scores.update({f"sel_{task}": m["text_acc"] for task, m in chosen.metrics.items() if task != "all"})
        scores.update({f"chance_{task}": c["text_acc"] for task, c in chosen.chance.items() if task != "all"})
    scores.update(fold=fold, n_items=len(emb.items), n_captions=len(emb.captions), seconds=time.perf_counter() - start,
                  train_seconds=trained, epochs=result.epochs, best_epoch=best_epoch(result.run_dir),
                  run=result.run_dir.name, item=modality.short, load=[load_before, load_after])
    t2x, x2t = directions(modality.short)
    chosen = "  ".join(f"{k[4:]} {v:.3f}" for k, v in scores.items() if k.startswith("sel_"))
    print(f"{label} {'seed' if args.seeds else 'fold'} {fold}: {t2x} R@1 {scores['t2i_r1']:.3f}  {x2t} R@1 "
          f"{scores['i2t_r1']:.3f}  {chosen}  ({scores['n_items']} test {modality.plural}, {result.epochs} epochs, "
          f"{trained:.0f}s training, load {load_before:.1f} -> {load_after:.1f})", flush=True)
    return scores


def best_epoch(run_dir: Path) -> int:
    import pandas as pd

    history = pd.read_parquet(run_dir / "metrics.parquet")
    return int(history.loc[history["mean_recall"].idxmax(), "epoch"])


def mean_std(folds: list[dict], key: str) -> str:
    v = np.array([f[key] for f in folds], dtype=float)
    return f"{v.mean():.3f} ± {v.std():.3f}"


def chance_row(folds: list[dict]) -> list[str]:
    # a random ranking finds the one right image, or one of an image's c captions among c per image, with p ~ k / images
    n_img = np.mean([f["n_items"] for f in folds])
    return [f"{min(1, k / n_img):.3f}" for k in KS] * 2


def table(results: dict[str, list[dict]], with_time: bool = False, with_folds: bool = False) -> str:
    """Mean ± std over folds of Recall@1/5/10 both ways (caption-selection text_acc per task, when
    scored; training time and the load it ran under; how many folds ran), a chance row last."""
    first = next(iter(results.values()))[0]
    item = first.get("item", "i")
    tasks = sorted(k for k in first if k.startswith("sel_"))
    keys = COLS + [k for k in ("t2i_map10",) if k in first] + tasks  # DCASE's text→audio mAP@10 for sounds
    cols = [label_of(k, item) if not k.startswith("sel_") else f"{k[4:]} text_acc" for k in keys]
    cols += ["train s/run", "load"] if with_time else []
    cols += ["folds"] if with_folds else []
    lines = ["| method | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for label, folds in results.items():
        cells = [mean_std(folds, c) for c in keys]
        if with_time:
            cells.append(f"{np.mean([f.get('train_seconds', f['seconds']) for f in folds]):.0f}")
            loads = [x for f in folds for x in f.get("load", [])]
            cells.append(f"{min(loads):.1f}–{max(loads):.1f}" if loads else "")
        if with_folds:
            cells.append(str(len(folds)))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    ends = " |" * (1 + 2 * with_time + with_folds)  # the last cell's end, then an empty cell per extra column
    n = np.mean([f["n_items"] for f in next(iter(results.values()))])
    chance = chance_row(next(iter(results.values()))) + [f"{sum(1 / r for r in range(1, int(min(10, n)) + 1)) / n:.3f}"
                                                        for k in keys if k == "t2i_map10"]  # H(10) / n
    chance += [f"{first['chance_' + k[4:]]:.3f}" for k in tasks]
    lines.append("| chance | " + " | ".join(chance) + ends)
    return "\n".join(lines)


# ---------------------------------------------------------------------------- the report


def load_entries(paths: list[str]) -> tuple[str, dict[str, dict]]:
    entries, dataset = {}, None
    for p in paths:
        data = json.loads(Path(p).read_text())
        dataset = dataset or (f"{data['dataset']}, scored on {data['test_dataset']}" if data.get("test_dataset")
                              else data.get("dataset"))
        for fold in (f for e in data["entries"].values() for f in e["folds"]):
            if "n_images" in fold:  # saved before the item side had its own name
                fold["n_items"] = fold.pop("n_images")
        entries.update(data["entries"])
    return dataset, entries


def report(args) -> None:
    dataset, entries = load_entries(args.report)
    results = {label: e["folds"] for label, e in entries.items()}
    n_folds = {len(f) for f in results.values()}
    seeds = "scored on" in dataset
    what = "runs (seeds)" if seeds else "-fold cross-validation"
    lines = [f"{'/'.join(map(str, sorted(n_folds)))}{' ' if seeds else ''}{what} on {dataset} "
             f"({np.mean([f['n_items'] for f in next(iter(results.values()))]):.0f} test pictures"
             f"{'' if seeds else ' a fold'}), mean ± std over {'seeds' if seeds else 'folds'}:", "",
             table(results, with_time=True, with_folds=True)]
    paired = paired_rows(results)
    if paired:
        first = next(iter(results))
        tasks = [f"Δ {k[4:]} text_acc" for k in sorted(next(iter(results.values()))[0]) if k.startswith("sel_")]
        by = "seed by seed" if seeds else "fold by fold (the same test pictures)"
        lines += ["", f"Paired with {first} {by}: mean ± std of the difference, and on how many "
                  f"{'seeds' if seeds else 'folds'} the method was ahead:", "",
                  "| method | Δ t2i R@1 | Δ t2i R@10 | Δ i2t R@1 | Δ i2t R@10 | "
                  + " | ".join(tasks + ["t2i R@1 ahead"]) + " |", "|---" * (6 + len(tasks)) + "|"] + paired
    ceiling = json.loads(Path(args.ceiling).read_text()) if args.ceiling else None
    if ceiling:
        lines += ["", "Closed-form maps on the same folds (`benchmarks/ceiling.py`, fit on all non-test pairs):", "",
                  "| baseline | t2i R@1 | t2i R@5 | t2i R@10 | i2t R@1 | i2t R@5 | i2t R@10 |", "|---" * 7 + "|"]
        for name, folds in ceiling["baselines"].items():
            lines.append(f"| {name} | " + " | ".join(mean_std(folds, c) for c in COLS) + " |")
    same = {label: folds for label, folds in results.items() if "same_t2i_r1" in folds[0]}
    if same:
        lines += ["", "The same runs when captions of the same text count as one answer (`same_text_metrics`):", "",
                  "| method | t2i R@1 | t2i R@5 | i2t R@1 | i2t R@5 |", "|---" * 5 + "|"]
        for label, folds in same.items():
            lines.append(f"| {label} | " + " | ".join(mean_std(folds, f"same_{c}") for c in
                                                       ("t2i_r1", "t2i_r5", "i2t_r1", "i2t_r5")) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    if args.png:
        bar_chart(dataset, results, ceiling, Path(args.png))


def paired_rows(results: dict[str, list[dict]]) -> list[str]:
    """Each method against the first entry on the folds both ran (matched by `fold` where the scores
    name it, else by position), as markdown rows."""
    entries = list(results.items())
    if len(entries) < 2:
        return []
    base = entries[0][1]
    rows = []
    for label, folds in entries[1:]:
        pairs = [(base[i], f) for i, f in enumerate(folds) if i < len(base)]
        if all("fold" in f for f in folds) and all("fold" in b for b in base):
            by_fold = {b["fold"]: b for b in base}
            pairs = [(by_fold[f["fold"]], f) for f in folds if f["fold"] in by_fold]
        if not pairs:
            continue
        cells = []
        for key in PAIRED + tuple(k for k in sorted(base[0]) if k.startswith("sel_")):
            d = np.array([f[key] - b[key] for b, f in pairs])
            cells.append(f"{d.mean():+.3f} ± {d.std():.3f}")
        ahead = sum(f["t2i_r1"] > b["t2i_r1"] for b, f in pairs)
        rows.append(f"| {label} | " + " | ".join(cells) + f" | {ahead} of {len(pairs)} |")
    return rows


def bar_chart(dataset: str, results: dict[str, list[dict]], ceiling: dict | None, path: Path) -> None:
    """Grouped bars of R@1 and R@10 both ways per method, fold std as error bars, the best
    closed-form map as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = ["t2i_r1", "i2t_r1", "t2i_r10", "i2t_r10"]
    labels = list(results)
    x = np.arange(len(metrics))
    width = 0.8 / len(labels)
    fig, ax = plt.subplots(figsize=(9, 4.2), dpi=120)
    for i, label in enumerate(labels):
        vals = np.array([[f[m] for f in results[label]] for m in metrics])  # (metrics, folds)
        ax.bar(x + (i - (len(labels) - 1) / 2) * width, vals.mean(1), width, yerr=vals.std(1), capsize=2, label=label)
    if ceiling:
        for j, m in enumerate(metrics):
            best = max(np.mean([f[m] for f in folds]) for folds in ceiling["baselines"].values())
            ax.hlines(best, j - 0.42, j + 0.42, colors="black", linestyles="dashed",
                      label="best closed-form map" if j == 0 else None)
    chance = {m: min(1, int(m.split("r")[-1]) / np.mean([f["n_items"] for f in results[labels[0]]])) for m in metrics}
    ax.scatter(x, [chance[m] for m in metrics], marker="_", s=400, color="grey", label="chance", zorder=3)
    ax.set_xticks(x, ["text→image R@1", "image→text R@1", "text→image R@10", "image→text R@10"])
    ax.set_ylabel("recall (mean over folds ± std)")
    ax.set_title(f"{dataset}: k-fold cross-validation, DINOv2-small + MiniLM-L6")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


# ---------------------------------------------------------------------------- main


def save(path: str, dataset: str, label: str, method: str, extra: dict, folds: list[dict],
         test_dataset: str | None = None) -> None:
    p = Path(path)
    data = json.loads(p.read_text()) if p.is_file() else {"dataset": dataset, "test_dataset": test_dataset,
                                                          "entries": {}}
    data["entries"][label] = {"method": method, "options": extra, "folds": folds}
    p.write_text(json.dumps(data, indent=2, default=str))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset")
    parser.add_argument("--vision")
    parser.add_argument("--text")
    parser.add_argument("--methods", default="heads,bridge")
    parser.add_argument("--label", help="name of the entry (one method only; default: the method)")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--only", help="comma-separated folds to run (default: all), e.g. for a quick check")
    parser.add_argument("--seeds", help="comma-separated seeds: train on the dataset's own splits once per seed "
                                        "instead of folds")
    parser.add_argument("--test-dataset", help="with --seeds: score the test split of this dataset (default: the "
                                               "training dataset's)")
    parser.add_argument("--checkpoint", default="best", choices=("best", "last"), help="which checkpoint is scored")
    parser.add_argument("--tag", default=time.strftime("%Y%m%d-%H%M%S"))
    parser.add_argument("--json", help="add the per-fold scores to this file (other entries are kept)")
    parser.add_argument("--report", nargs="+",
                        help="write the README table from these --json files instead of training")
    parser.add_argument("--ceiling", help="with --report: benchmarks/ceiling.py --json output for the same dataset")
    parser.add_argument("--out", help="with --report: write the markdown here")
    parser.add_argument("--png", help="with --report: write a bar chart here")
    parser.add_argument("options", nargs="*", help="training options as key=value")
    args = parser.parse_args()
    if args.report:
        report(args)
        return
    if not (args.dataset and args.vision and args.text):
        parser.error("--dataset, --vision and --text are needed to train (or pass --report FILES)")
    extra = {k: parse_value(v) for k, v in (o.split("=", 1) for o in args.options)}
    methods = args.methods.split(",")
    if args.label and len(methods) > 1:
        parser.error("--label names one method's entry; pass one method")
    if args.test_dataset and not args.seeds:
        parser.error("--test-dataset goes with --seeds (folds are scored on their own test fold)")
    folds = [int(k) for k in (args.seeds or args.only or "").split(",") if k] or range(args.folds)
    results = {}
    for m in methods:
        label = args.label or m
        results[label] = [run_fold(args, m, label, k, extra) for k in folds]
        if args.json:
            save(args.json, args.dataset, label, m, extra, results[label], args.test_dataset)
    print()
    what = f"seeds {args.seeds}" if args.seeds else f"{args.folds}-fold cross-validation"
    print(f"{what} on {args.dataset}, options {extra or 'default'}:")
    print(table(results, with_time=True))


if __name__ == "__main__":
    main()
