"""k-fold cross-validated retrieval of training methods on a prepared dataset.

For each method and fold: train with `--folds K --fold k` (test = fold k, val = 10% of the rest),
embed the held-out test fold with the best checkpoint, and score it. Prints mean ± std over folds
of text→item and item→text Recall@1/5/10 (t2i/i2t for pictures, t2a/a2t for sounds, with DCASE's
text→audio mAP@10), with chance level beside them.

    python benchmarks/crossval.py --dataset tuxpaint \
        --vision ~/.cache/mmret-offline/models/dinov2-small --text ~/.cache/mmret-offline/models/all-minilm-l6-v2
    python benchmarks/crossval.py --dataset tuxpaint-sounds \
        --vision spectrogram:$HOME/.cache/mmret-offline/models/dinov2-small --text ~/.cache/mmret-offline/models/all-minilm-l6-v2

Extra `key=value` arguments set training options for every run (e.g. epochs=40 mixup=0.4).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from mmret.data import load_dataset
from mmret.inference.embeddings import write_run_embeddings
from mmret.inference.metrics import directions, retrieval_metrics
from mmret.modalities import get_modality
from mmret.runs import RunConfig, with_overrides
from mmret.training import train

KS = (1, 5, 10)


def parse_value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def run_fold(args, method: str, fold: int, extra: dict) -> dict:
    options = dict(method=method, dataset=args.dataset, vision=args.vision, text=args.text, folds=args.folds,
                   fold=fold, name=f"cv-{args.tag}-{method}-fold{fold}", **extra)
    cfg = with_overrides(RunConfig(), options)
    start = time.perf_counter()
    result = train(cfg)
    emb = write_run_embeddings(result.run_dir, split="test")
    images, captions = (torch.from_numpy(np.asarray(a, dtype=np.float32)) for a in (emb.images, emb.captions))
    modality = get_modality(emb.modality)
    scores = retrieval_metrics(images, captions, emb.caption_image, item=modality.short, map_at=modality.map_at).metrics
    scores.update(n_images=len(emb.images), n_captions=len(emb.captions), seconds=time.perf_counter() - start,
                  epochs=result.epochs)
    t2x, x2t = directions(modality.short)
    print(f"{method} fold {fold}: {t2x} R@1 {scores[f'{t2x}_r1']:.3f}  {x2t} R@1 {scores[f'{x2t}_r1']:.3f}  "
          f"({scores['n_images']} test {modality.plural}, {result.epochs} epochs, {scores['seconds']:.0f}s)", flush=True)
    return scores


def table(results: dict[str, list[dict]], item: str = "i", map_at: tuple[int, ...] = ()) -> str:
    keys = [(f"{d}_r{k}", f"{d} R@{k}") for d in directions(item) for k in KS]
    keys += [(f"{directions(item)[0]}_map{k}", f"{directions(item)[0]} mAP@{k}") for k in map_at]
    lines = ["| method | " + " | ".join(label for _, label in keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for method, folds in results.items():
        cells = []
        for key, _ in keys:
            v = np.array([f[key] for f in folds])
            cells.append(f"{v.mean():.3f} ± {v.std():.3f}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    any_folds = next(iter(results.values()))
    n_img = np.mean([f["n_images"] for f in any_folds])
    # a random ranking finds the one right item, or one of an item's c captions among c per item, with p ~ k / items;
    # its mAP@k is the mean of 1/rank over ranks 1..k out of n: H(k) / n
    chance = [f"{min(1, k / n_img):.3f}" for k in KS] * 2
    chance += [f"{sum(1 / r for r in range(1, int(min(k, n_img)) + 1)) / n_img:.3f}" for k in map_at]
    lines.append("| chance | " + " | ".join(chance) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--vision", required=True)
    parser.add_argument("--text", required=True)
    parser.add_argument("--methods", default="heads,bridge")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--only", help="comma-separated folds to run (default: all), e.g. for a quick check")
    parser.add_argument("--tag", default=time.strftime("%Y%m%d-%H%M%S"))
    parser.add_argument("--json", help="also write the per-fold scores here")
    parser.add_argument("options", nargs="*", help="training options as key=value")
    args = parser.parse_args()
    extra = {k: parse_value(v) for k, v in (o.split("=", 1) for o in args.options)}
    folds = [int(k) for k in args.only.split(",")] if args.only else range(args.folds)
    results = {m: [run_fold(args, m, k, extra) for k in folds] for m in args.methods.split(",")}
    print()
    print(f"{args.folds}-fold cross-validation on {args.dataset}, options {extra or 'default'}:")
    modality = get_modality(load_dataset(args.dataset).modality.name)
    print(table(results, modality.short, modality.map_at))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
