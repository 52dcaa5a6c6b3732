"""Retrieval on int8 picture features against bf16 ones: one trained heads run, evaluated on both.

The issue's retrieval-level check for `--precision int8` (cosine alone does not say whether the
ranking survives). On a real dataset (default Tux Paint, over DINOv2-small and MiniLM-L6):
  1. the picture features are encoded in bf16 and the caption features as `auto` chooses;
  2. a `heads` run trains on them;
  3. the run embeds the evaluation split from the bf16 cache and is scored (Recall@1/5/10 both ways);
  4. the picture cache is replaced by one encoded with `--precision int8` (the same cache key: only
     the precision differs) and the same run embeds and is scored again.
It prints both, the differences in points (target: every |difference| <= 0.5) and the cosine
between the two caches' rows. `--split all` (the default) scores every picture, so one picture
that moves is 100/538 = 0.19 points rather than a whole point of a 108-picture test fold; the
run trained on most of them, which does not matter for comparing two encodings of the same
pictures through the same heads.

Two forms, one per int8 path (`--form`):
  torch    torch's own: PT2E int8 (torchao) against torch's bf16; inference runtimes turned off;
  runtime  the inference runtime's own: OpenVINO's int8 model quantised by NNCF, against OpenVINO's bf16
           (`mmret.features.backend`). The cosine rule is lifted for int8 here, so that what NNCF made is
           what gets scored (the rule's verdict is printed beside it); and the two OpenVINO forms are timed
           in this process, alternating, on one batch of the dataset's pictures (target: int8 >= 1.5x bf16).

    python benchmarks/int8_recall.py [--form torch|runtime] [--root ~/.cache/mmret-offline/data/tuxpaint]
                                     [--split all] [key=value ...]
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from crossval import parse_value  # the same key=value options as crossval.py (this folder is on sys.path when run)
from machine import cpu_model, loadavg  # benchmarks/machine.py

from mmret.common import device
from mmret.data import PrepareConfig, load_dataset, prepare
from mmret.encoders import load_image_encoder
from mmret.features import backend, ensure_features
from mmret.features.cache import cache_rows
from mmret.inference.embeddings import write_run_embeddings
from mmret.metrics.retrieval import retrieval_metrics
from mmret.runs import RunConfig, with_overrides
from mmret.training import train

OFFLINE = Path("~/.cache/mmret-offline").expanduser()
KEYS = [f"{d}_r{k}" for d in ("t2i", "i2t") for k in (1, 5, 10)]


def score(run_dir: Path, split: str) -> dict:
    shutil.rmtree(run_dir / "embeddings", ignore_errors=True)  # embed again from the cache now in place
    emb = write_run_embeddings(run_dir, split=split)
    images, captions = (torch.from_numpy(np.asarray(a, dtype=np.float32)) for a in (emb.items, emb.captions))
    return retrieval_metrics(images, captions, emb.caption_item).metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=OFFLINE / "data" / "tuxpaint")
    parser.add_argument("--vision", default=str(OFFLINE / "models" / "dinov2-small"))
    parser.add_argument("--text", default=str(OFFLINE / "models" / "all-minilm-l6-v2"))
    parser.add_argument("--split", default="all", help="the split scored: all, train, val or test")
    parser.add_argument("--reference", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--form", default="torch", choices=["torch", "runtime"], help="whose int8: see above")
    parser.add_argument("--rounds", type=int, default=5, help="runtime form: timed batches per contestant")
    parser.add_argument("options", nargs="*", help="training options as key=value (e.g. epochs=40)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="  %(levelname)s %(name)s: %(message)s")
    warnings.filterwarnings("ignore", category=UserWarning)
    print(f"{cpu_model()}; torch {torch.__version__}, {torch.get_num_threads()} threads; load {loadavg()}")
    os.environ["MMRET_RUNTIME"] = "torch" if args.form == "torch" else "auto"
    bound = device.MIN_COSINE["int8"]
    if args.form == "runtime":
        device.MIN_COSINE["int8"] = -1.0  # keep what NNCF made, to score it; the verdict under `bound` is printed
        backend.TRIAL_SECONDS = 0.0  # the bf16 reference in OpenVINO too, however little work is left
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        name = args.root.name
        prepare(PrepareConfig(source="folder", root=args.root, name=name, data_dir=tmp / "data"))
        dataset = load_dataset(name, tmp / "data")
        encoder = load_image_encoder(args.vision)
        start = time.perf_counter()
        ref = ensure_features(dataset, encoder, "images", precision=args.reference)
        print(f"{len(ref.pooled)} pictures in {args.reference} in {time.perf_counter() - start:.0f} s "
              f"({ref.stats.precision_reason}; backend {ref.manifest.get('backend') or 'torch'})", flush=True)
        reference = np.array(ref.pooled, dtype=np.float32)
        options = dict(method="heads", dataset=name, data_dir=tmp / "data", runs_dir=tmp / "runs", item=args.vision,
                       text=args.text, device="cpu", name="int8-check")
        options.update(parse_value_pairs(args.options))
        result = train(with_overrides(RunConfig(), options))
        scores = {args.reference: score(result.run_dir, args.split)}
        shutil.move(str(ref.path), str(tmp / "reference-cache"))  # out of the features root: nothing lends from it
        start = time.perf_counter()
        low = ensure_features(dataset, encoder, "images", precision="int8")
        assert low.path == ref.path and low.stats.precision == "int8", (low.path, low.stats.precision)
        print(f"{len(low.pooled)} pictures in int8 in {time.perf_counter() - start:.0f} s "
              f"({low.stats.precision_reason}; backend {low.manifest.get('backend') or 'torch'})", flush=True)
        got = np.array(low.pooled, dtype=np.float32)
        cos = (got * reference).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(reference, axis=1)
        scores["int8"] = score(result.run_dir, args.split)
        if args.form == "runtime":
            first = float(cos[:low.stats.batch_size].min())
            print(f"the rule (cosine >= {bound} on the first batch, here {first:.4f}) would "
                  f"{'keep' if first >= bound else 'NOT keep'} the runtime's int8")
            speed(dataset, encoder, args.rounds)
    print(f"\nint8 vs {args.reference} picture features, per row: cosine min {cos.min():.4f}, mean {cos.mean():.4f}")
    print(f"\nRecall (%) of one heads run on {name} ({args.split}), scored on each picture cache:")
    print(f"{'':8s}" + "".join(f"{k:>9s}" for k in KEYS))
    for precision, s in scores.items():
        print(f"{precision:8s}" + "".join(f"{100 * s[k]:9.2f}" for k in KEYS))
    diff = {k: 100 * (scores["int8"][k] - scores[args.reference][k]) for k in KEYS}
    print(f"{'int8 - ' + args.reference:8s}" + "".join(f"{diff[k]:+9.2f}" for k in KEYS))
    worst = max(abs(v) for v in diff.values())
    print(f"\nlargest difference {worst:.2f} points: {'within' if worst <= 0.5 else 'NOT within'} the 0.5-point target")
    print(f"load at end {loadavg()}")


def speed(dataset, encoder, rounds: int) -> None:
    """OpenVINO's bf16 and int8 forms of the tower on the first batch of 32 pictures, alternating."""
    rows = cache_rows(dataset, "images")
    load = encoder.item_loader().reading(dataset.roots)
    inputs = {encoder.input_name: torch.stack([load(p) for p in rows["path"][:32]])}
    onnx = backend.convert(encoder, inputs)
    towers = {"bf16": backend.RuntimeTower("openvino", onnx),  # OpenVINO's default: bf16 on a CPU with bf16 units
              "int8": backend.RuntimeTower("openvino", backend.int8_folder(encoder, inputs) / "tower.xml")}
    seconds: dict[str, list[float]] = {k: [] for k in towers}
    for tower in towers.values():
        tower(**inputs)  # kernels built outside the clock
    for _ in range(rounds):
        for name, tower in towers.items():
            start = time.perf_counter()
            tower(**inputs)
            seconds[name].append(time.perf_counter() - start)
    rate = {k: len(rows[:32]) / float(np.median(v)) for k, v in seconds.items()}
    print(f"\nOpenVINO, batch 32, median of {rounds} alternating rounds: bf16 {rate['bf16']:.1f} img/s, "
          f"int8 {rate['int8']:.1f} img/s, int8/bf16 {rate['int8'] / rate['bf16']:.2f}x (target 1.5x)")


def parse_value_pairs(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        out[key] = parse_value(value)
    return out


if __name__ == "__main__":
    main()
