"""How fast `precompute-embeddings` encodes images: DINOv2 ViT-S/14 at 224 px on this machine.

Prints images/s for
  naive     load, preprocess and encode one image at a time (fp32, batch 1, no workers),
  pipeline  `ensure_features` as the command runs it (DataLoader workers, batches, inference
            mode, precision chosen at run time), eager and with --compile,
and from them
  (a) the model's FLOP/s (FLOPs counted with torch.utils.flop_counter) over the dense matrix-multiply
      FLOP/s this machine reaches in the same run and dtype (target >= 0.6),
  (b) the pipeline's speed-up over the naive loop (target >= 3x).

The images are generated photos (640x480 JPEG, the size of Flickr30k's) in a temporary dataset.
The model is the offline dinov2-small folder when present, else a random DINOv2-S built from its
config. Measurements alternate over `--rounds` and the best of each is kept, because the machine's
cores may be shared. Every rate is printed twice: per wall-clock second (what a user waits) and per
CPU second times the thread count (what the work costs: it hardly changes when other programs
compete for the cores); the load average is printed so the wall numbers can be judged.

    python benchmarks/precompute.py [--images 160] [--rounds 2] [--model PATH] [--no-compile] [--threads N]
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mmret.data import PrepareConfig, load_dataset, prepare
from mmret.encoders import load_image_encoder
from mmret.features import ensure_features
from mmret.modalities.image import load_rgb

OFFLINE = Path("~/.cache/mmret-offline/models/dinov2-small").expanduser()


def make_photos(root: Path, n: int, seed: int = 0) -> None:
    """`n` smooth random 640x480 JPEGs (upsampled noise compresses and decodes like photos) + captions."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    for i in range(n):
        small = Image.fromarray(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8))
        small.resize((640, 480), Image.Resampling.BICUBIC).save(root / f"photo{i:04d}.jpg", quality=90)
        (root / f"photo{i:04d}.txt").write_text(f"photo number {i}")


def model_folder(path: Path | None, tmp: Path) -> Path:
    if path is not None and path.is_dir():
        return path
    from transformers import Dinov2Config, Dinov2Model

    print(f"  {path} not found: using a random DINOv2-S built from its config")
    folder = tmp / "dinov2-small-random"
    Dinov2Model(Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, patch_size=14,
                             image_size=518)).save_pretrained(folder)
    return folder


def flops_per_image(encoder) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        encoder(torch.zeros(1, 3, *encoder.image_size))
    return float(counter.get_total_flops())


class Meter:
    """Wall time and CPU time (this process + finished children, e.g. DataLoader workers) of a call.

    CPU time is what the work cost; wall time is what a user waits. When other programs share the
    cores, wall time grows and CPU time barely does, so CPU-time rates (scaled by the thread count)
    tell what this machine does when it is not shared."""

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), _cpu()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.wall, _cpu() - self.cpu


def _cpu() -> float:
    import resource

    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


THREADS = torch.get_num_threads()


def rates(work: float, meter: Meter) -> tuple[float, float]:
    """(work per wall second, work per CPU second x threads)."""
    return work / meter.wall, work / meter.cpu * THREADS


def matmul(dtype: torch.dtype, n: int = 2048, reps: int = 5) -> tuple[float, float]:
    """Best dense n x n matmul FLOP/s over `reps` tries: (wall, CPU-time based)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = (0.0, 0.0)
    for _ in range(reps):
        with Meter() as m:
            a @ b
        best = tuple(map(max, best, rates(2 * n**3, m)))
    return best


def naive(encoder, paths: list[str]) -> tuple[float, float]:
    """Images/s of the loop a tutorial writes: one image loaded, preprocessed and encoded at a time."""
    transform = encoder.transform()
    with Meter() as m, torch.no_grad():
        for p in paths:
            encoder.model(pixel_values=transform(load_rgb(p)).unsqueeze(0))
    return rates(len(paths), m)


class Clock:
    """A Reporter that notes when each batch lands (wall and CPU time), to tell the first batch
    (precision check, compile) from the steady state."""

    def __init__(self):
        self.marks: list[tuple[float, float, int]] = []

    def task(self, description, total=None, unit="it"):
        return self

    def advance(self, n: int = 1, **fields) -> None:
        if n:
            self.marks.append((time.perf_counter(), time.process_time(), n))

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    def steady(self) -> tuple[float, float]:
        """Images/s after the first batch: (wall, CPU time of this process x threads)."""
        (w0, c0, _), rest = self.marks[0], self.marks[1:]
        n = sum(k for _, _, k in rest)
        return n / (rest[-1][0] - w0), n / (rest[-1][1] - c0) * THREADS


def pipeline(dataset, encoder, compile: bool) -> dict:
    shutil.rmtree(dataset.path / "features", ignore_errors=True)
    clock = Clock()
    with Meter() as m:
        feats = ensure_features(dataset, encoder, "images", compile=compile, reporter=clock)
    s = feats.stats
    return {"overall": rates(s.encoded, m), "steady": clock.steady(), "precision": s.precision,
            "compiled": s.compiled, "reason": s.precision_reason, "batch": s.batch_size}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=160)
    parser.add_argument("--naive-images", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--model", type=Path, default=OFFLINE)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (1 avoids threads waiting on each other when the cores are shared)")
    args = parser.parse_args()
    if args.threads:
        global THREADS
        torch.set_num_threads(args.threads)
        THREADS = args.threads
    logging.basicConfig(level=logging.WARNING, format="  %(levelname)s %(name)s: %(message)s")
    print(f"torch {torch.__version__}, {THREADS} threads, {os.cpu_count()} CPUs, "
          f"load average at start {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_photos(tmp / "photos", args.images)
        prepare(PrepareConfig(source="folder", root=tmp / "photos", name="bench", val=0.0, test=0.0, data_dir=tmp / "data"))
        dataset = load_dataset("bench", tmp / "data")
        encoder = load_image_encoder(str(model_folder(args.model, tmp)))
        flops = flops_per_image(encoder)
        print(f"model {encoder.name}: {flops / 1e9:.2f} GFLOP per {encoder.image_size[0]} px image (FlopCounterMode); "
              f"{len(dataset.images)} photos, 640x480 JPEG")
        best: dict[str, tuple[float, float]] = {}
        info: dict[str, dict] = {}

        def keep(name: str, value: tuple[float, float]) -> None:
            best[name] = tuple(map(max, best.get(name, (0.0, 0.0)), value))

        for r in range(args.rounds):
            keep("matmul fp32", matmul(torch.float32))
            keep("matmul bf16", matmul(torch.bfloat16))
            keep("naive", naive(encoder, dataset.images["path"].tolist()[: args.naive_images]))
            for compile in [False] if args.no_compile else [False, True]:
                name = "pipeline, compiled" if compile else "pipeline"
                info[name] = pipeline(dataset, encoder, compile)
                keep(f"{name} overall", info[name]["overall"])
                keep(f"{name} steady", info[name]["steady"])
            print(f"  round {r + 1} done, load average {os.getloadavg()[0]:.1f}")
        report(best, info, flops)
    print(f"load average at end {os.getloadavg()[0]:.1f}")


def report(best: dict[str, tuple[float, float]], info: dict[str, dict], flops: float) -> None:
    print(f"\n{'best of rounds':44s} {'wall':>9s} {'CPU-time':>9s}")
    for dtype in ("fp32", "bf16"):
        w, c = best[f"matmul {dtype}"]
        print(f"{'dense 2048^2 matmul ' + dtype + ', GFLOP/s':44s} {w / 1e9:9.0f} {c / 1e9:9.0f}")
    print(f"{'naive loop (fp32, batch 1), images/s':44s} {best['naive'][0]:9.1f} {best['naive'][1]:9.1f}")
    for name, res in info.items():
        for part, label in (("overall", "overall"), ("steady", "after the 1st batch")):
            w, c = best[f"{name} {part}"]
            print(f"{name + ' ' + label + ', images/s':44s} {w:9.1f} {c:9.1f}")
        print(f"    precision {res['precision']}, batch {res['batch']}: {res['reason']}")
    for name, res in info.items():
        dtype = "bf16" if res["precision"] == "bf16" else "fp32"
        peak, steady, overall = best[f"matmul {dtype}"], best[f"{name} steady"], best[f"{name} overall"]
        ratio = [steady[i] * flops / peak[i] for i in (0, 1)]
        print(f"\n{name}:\n  (a) model FLOP/s / dense matmul FLOP/s ({dtype}): {ratio[0]:.2f} wall, {ratio[1]:.2f} CPU-time"
              f"   (model {steady[0] * flops / 1e9:.0f} of {peak[0] / 1e9:.0f} GFLOP/s wall; target >= 0.6)")
        print(f"  (b) speed-up over the naive loop: {overall[0] / best['naive'][0]:.2f}x wall, "
              f"{overall[1] / best['naive'][1]:.2f}x CPU-time overall; {steady[0] / best['naive'][0]:.2f}x wall, "
              f"{steady[1] / best['naive'][1]:.2f}x CPU-time after the 1st batch   (target >= 3x)")


if __name__ == "__main__":
    main()
