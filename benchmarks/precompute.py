"""How fast `precompute-embeddings` encodes images, against this machine's own limit.

Everything is measured in one run, on DINOv2 ViT-S/14 at 224 px (the offline dinov2-small folder,
else a random DINOv2-S built from its config):
  bound     dense matrix-multiply GFLOP/s in fp32, bf16 and int8 at the shapes the model runs at
            batch B (its linear layers, found by hooks: M = B x tokens) and at a large square one,
            and the model's GEMMs at those rates (its "matmul bound"); int8 is oneDNN's qlinear
            (u8 x s8, per-channel scales) with float32 output, as the int8 tower runs it; fp32 and
            bf16 also through OpenVINO's own kernels (ov-fp32, ov-bf16), and the bound of a dtype
            is the better of the two;
  model     FLOPs per picture (torch.utils.flop_counter, attention counted through SDPA's math
            form), and how fast decoding + preprocessing one picture runs on one core;
  naive     load, preprocess and encode one picture at a time (fp32, batch 1, no workers);
  pipeline  `ensure_features` as the command runs it (DataLoader workers, batches), for every
            precision (fp32, bf16, int8) eager and compiled (torch's int8 has only a compiled form), and
            through an inference runtime (`runtime`: OpenVINO / ONNX Runtime as `mmret.features.backend`
            tries them, converting once; kept only when it passes the measured rule, else torch eager).
For each pipeline: images/s, the model's FLOP/s, that over the dense matmul rate of its dtype at
the model's shapes (target for bf16 >= 0.6), the speed-up over the naive loop (target >= 3x), and
for int8 the speed-up over the bf16 pipeline (target >= 1.5x); plus the compile time and the
cosine to fp32 the run recorded. Rates are printed per wall-clock second (what a user waits) and
per CPU second times the thread count (what the work costs: it hardly changes when other programs
compete for the cores); the load average is printed so the wall numbers can be judged.

    python benchmarks/precompute.py [--images 256] [--photo 640x480] [--precisions fp32 bf16 int8]
                                    [--forms eager compiled runtime] [--threads N] [--model PATH]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from machine import cpu_model, loadavg  # benchmarks/machine.py
from PIL import Image

from mmret.common.paths import ANYWHERE
from mmret.data import PrepareConfig, load_dataset, prepare
from mmret.encoders import load_image_encoder
from mmret.features import backend, ensure_features

OFFLINE = Path("~/.cache/mmret-offline/models/dinov2-small").expanduser()
THREADS = torch.get_num_threads()


def make_photos(root: Path, n: int, size: tuple[int, int], seed: int = 0) -> None:
    """`n` smooth random JPEGs (upsampled noise compresses and decodes like photos) + captions."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    for i in range(n):
        small = Image.fromarray(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8))
        small.resize(size, Image.Resampling.BICUBIC).save(root / f"photo{i:04d}.jpg", quality=90)
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


class Meter:
    """Wall time and CPU time (this process + finished children, e.g. DataLoader workers)."""

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), _cpu()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.wall, _cpu() - self.cpu


def _cpu() -> float:
    import resource

    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def rates(work: float, meter: Meter, threads: int = 0) -> tuple[float, float]:
    """(work per wall second, work per CPU second x threads)."""
    return work / meter.wall, work / meter.cpu * (threads or THREADS)


def best_rate(fn, work: float, reps: int = 5) -> tuple[float, float]:
    fn()
    best = (0.0, 0.0)
    for _ in range(reps):
        with Meter() as m:
            fn()
        best = tuple(map(max, best, rates(work, m)))
    return best


# --- the bound ----------------------------------------------------------------------------------


def model_gemms(encoder, batch: int) -> dict[tuple[int, int, int], int]:
    """{(M, K, N): count} of the linear layers' products in one forward pass of `batch` pictures."""
    shapes: dict[tuple[int, int, int], int] = {}

    def hook(module, args, _out):
        x = args[0]
        key = (batch * x[0].numel() // x.shape[-1], x.shape[-1], module.out_features)
        shapes[key] = shapes.get(key, 0) + 1

    handles = [m.register_forward_hook(hook) for m in encoder.modules() if isinstance(m, torch.nn.Linear)]
    with torch.inference_mode():
        encoder(torch.zeros(1, 3, *encoder.image_size))
    for h in handles:
        h.remove()
    return shapes


def gemm_rate(dtype: str, m: int, k: int, n: int) -> tuple[float, float]:
    """Best GFLOP/s of an (m, k) x (k, n) product: fp32 / bf16 through torch (oneDNN, AMX for bf16),
    int8 through oneDNN's qlinear (u8 activations, s8 weights prepacked, float32 out)."""
    flops = 2 * m * k * n
    if dtype == "int8":
        x = torch.randint(0, 255, (m, k), dtype=torch.uint8)
        w = torch.ops.onednn.qlinear_prepack(torch.randint(-127, 127, (n, k), dtype=torch.int8), [m, k])
        scales, zeros = torch.ones(n), torch.zeros(n, dtype=torch.int64)
        return best_rate(lambda: torch.ops.onednn.qlinear_pointwise(x, 0.1, 128, w, scales, zeros, None, 1.0, 0,
                                                                    torch.float32, "none", [], ""), flops)
    t = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    a, b = torch.randn(m, k, dtype=t), torch.randn(k, n, dtype=t)
    return best_rate(lambda: a @ b, flops)


def openvino_gemm_rate(dtype: str, m: int, k: int, n: int) -> tuple[float, float]:
    """Best GFLOP/s of the same product through OpenVINO's own CPU kernels (one MatMul against
    constant weights, as a converted tower runs its linear layers), at its fp32 or bf16 precision."""
    import openvino as ov
    import openvino.opset13 as ops

    x = ops.parameter([m, k], np.float32, name="x")
    model = ov.Model([ops.matmul(x, ops.constant(np.random.randn(k, n).astype(np.float32)), False, False)], [x])
    hints = {"INFERENCE_PRECISION_HINT": {"fp32": "f32", "bf16": "bf16"}[dtype], "INFERENCE_NUM_THREADS": THREADS}
    compiled = ov.Core().compile_model(model, "CPU", hints)
    request, data = compiled.create_infer_request(), {0: np.random.randn(m, k).astype(np.float32)}
    return best_rate(lambda: request.infer(data), 2 * m * k * n)


DTYPES = ("fp32", "bf16", "int8", "ov-fp32", "ov-bf16")  # torch (oneDNN) and OpenVINO's kernels


def bound(encoder, batch: int) -> dict:
    """GFLOP/s per dtype at each model shape and a 2048^3 square, and the model's GEMMs' rate; the
    bound of fp32 and bf16 is the better of torch's and OpenVINO's kernels (when OpenVINO is installed)."""
    shapes = model_gemms(encoder, batch)
    out = {"shapes": shapes, "rate": {}, "model": {}}
    try:
        import openvino  # noqa: F401
        dtypes = DTYPES
    except ImportError:
        dtypes = DTYPES[:3]
    for dtype in dtypes:
        rate = (lambda *s: openvino_gemm_rate(dtype[3:], *s)) if dtype.startswith("ov-") else \
            (lambda *s: gemm_rate(dtype, *s))
        total_flops, seconds = 0.0, [0.0, 0.0]
        for (m, k, n), count in sorted(shapes.items()):
            r = rate(m, k, n)
            out["rate"][(dtype, m, k, n)] = r
            total_flops += 2 * m * k * n * count
            seconds = [s + 2 * m * k * n * count / ri for s, ri in zip(seconds, r)]
        out["model"][dtype] = tuple(total_flops / s for s in seconds)  # the model's GEMMs at these rates
        out["rate"][(dtype, 2048, 2048, 2048)] = rate(2048, 2048, 2048)
    for dtype in ("fp32", "bf16"):
        if f"ov-{dtype}" in out["model"]:
            out["model"][f"best-{dtype}"] = tuple(map(max, out["model"][dtype], out["model"][f"ov-{dtype}"]))
    return out


def flops_per_image(encoder) -> float:
    """FLOPs of one picture; SDPA runs in its math form so that attention's products are counted."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.inference_mode(), sdpa_kernel(SDPBackend.MATH):
        encoder(torch.zeros(1, 3, *encoder.image_size))
    return float(counter.get_total_flops())


def decode_rate(encoder, paths: list[str]) -> tuple[float, float]:
    """Pictures/s of decoding + preprocessing on one core (as a DataLoader worker runs it)."""
    load = encoder.item_loader().reading(ANYWHERE)  # the benchmark's own files
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        load(paths[0])
        with Meter() as m:
            for p in paths:
                load(p)
        return rates(len(paths), m, threads=1)
    finally:
        torch.set_num_threads(threads)


# --- the contestants ----------------------------------------------------------------------------


def naive(encoder, paths: list[str]) -> tuple[float, float]:
    """Images/s of the loop a tutorial writes: one image loaded, preprocessed and encoded at a time."""
    from mmret.modalities.image import load_rgb

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

    def note(self, message: str, warning: bool = False) -> None:
        pass

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
        """Images/s after the first batch: (wall, CPU time of this process x threads; the decoding
        workers' time is not in it)."""
        (w0, c0, _), rest = self.marks[0], self.marks[1:]
        n = sum(k for _, _, k in rest)
        return n / (rest[-1][0] - w0), n / (rest[-1][1] - c0) * THREADS


def pipeline(dataset, encoder, precision: str, form: str, workers: int | None) -> dict:
    shutil.rmtree(dataset.path / "features", ignore_errors=True)
    os.environ["MMRET_RUNTIME"] = "auto" if form == "runtime" else "torch"
    backend.TRIAL_SECONDS = -1.0  # the runtime form tries the runtime whatever the work left
    clock = Clock()
    start = time.perf_counter()
    with Meter() as m:
        feats = ensure_features(dataset, encoder, "images", precision=precision, compile=form == "compiled",
                                reporter=clock, workers=workers)
    s = feats.stats
    first = clock.marks[0][0] - start
    ran = json.loads((feats.path / "manifest.json").read_text()).get("backend")
    return {"overall": rates(s.encoded, m), "steady": clock.steady(), "precision": s.precision,
            "compiled": s.compiled, "reason": s.precision_reason, "batch": s.batch_size, "first_s": first,
            "backend": ran}


# --- the report ---------------------------------------------------------------------------------


def report(b: dict, flops: float, decode: tuple, naive_rate: tuple, runs: dict, batch: int) -> None:
    w, c = "wall", "CPU-time"
    print(f"\n== the bound: dense matmul GFLOP/s ({w} / {c}) ==")
    dtypes = [d for d in DTYPES if d in b["model"]]
    print(f"{'shape (M x K x N)':28s} {'count':>5s} " + " ".join(f"{d:>17s}" for d in dtypes))
    for (m, k, n), count in sorted(b["shapes"].items()) + [((2048, 2048, 2048), 0)]:
        cells = " ".join(f"{b['rate'][(d, m, k, n)][0] / 1e9:8.0f}/{b['rate'][(d, m, k, n)][1] / 1e9:<8.0f}"
                         for d in dtypes)
        print(f"{f'{m} x {k} x {n}':28s} {count or '':>5} {cells}")
    cells = " ".join(f"{b['model'][d][0] / 1e9:8.0f}/{b['model'][d][1] / 1e9:<8.0f}" for d in dtypes)
    print(f"{'the model GEMMs at B=' + str(batch):28s} {'':>5s} {cells}")
    print(f"\nmodel: {flops / 1e9:.2f} GFLOP per picture; decoding + preprocessing {decode[0]:.0f} / {decode[1]:.0f} "
          f"pictures/s on one core ({w} / {c})")
    print(f"\n{'contestant':30s} {'images/s':>17s} {'GFLOP/s':>17s} {'x matmul':>13s} {'x naive':>13s} "
          f"{'x bf16':>13s} {'1st batch':>9s}  precision")
    print(f"{'naive loop (fp32, batch 1)':30s} {naive_rate[0]:8.1f}/{naive_rate[1]:<8.1f} "
          f"{naive_rate[0] * flops / 1e9:8.0f}/{naive_rate[1] * flops / 1e9:<8.0f} "
          f"{naive_rate[0] * flops / b['model']['fp32'][0]:6.2f}/{naive_rate[1] * flops / b['model']['fp32'][1]:<6.2f}")
    bf16 = {form: runs[("bf16", form)]["steady"] for form in ("eager", "compiled") if ("bf16", form) in runs}
    for (precision, form), r in runs.items():
        s = r["steady"]
        dtype = r["precision"] if r["precision"] in ("fp32", "bf16", "int8") else "fp32"
        peak = b["model"].get(f"best-{dtype}", b["model"][dtype])  # the better of torch's and OpenVINO's
        vs_bf16 = bf16.get(form) or bf16.get("compiled")
        rel = f"{s[0] / vs_bf16[0]:6.2f}/{s[1] / vs_bf16[1]:<6.2f}" if vs_bf16 and precision != "bf16" else f"{'':13s}"
        print(f"{precision + ', ' + form:30s} {s[0]:8.1f}/{s[1]:<8.1f} "
              f"{s[0] * flops / 1e9:8.0f}/{s[1] * flops / 1e9:<8.0f} "
              f"{s[0] * flops / peak[0]:6.2f}/{s[1] * flops / peak[1]:<6.2f} "
              f"{s[0] / naive_rate[0]:6.2f}/{s[1] / naive_rate[1]:<6.2f} {rel} {r['first_s']:8.0f}s  "
              f"{r['precision']}{' compiled' if r['compiled'] else ''}{' ' + r['backend'] if r['backend'] else ''}")
    print("\nimages/s after the first batch (which holds the precision check and any compile); 'x matmul' is the "
          "model's FLOP/s over the best dense matmul rate (torch's or OpenVINO's kernels) of the dtype it ran in, "
          "at the model's shapes (targets: "
          "bf16 >= 0.6, >= 3x naive; int8 >= 1.5x bf16)")
    for (precision, form), r in runs.items():
        print(f"  {precision}, {form}: {r['reason']}")
    for precision in ("fp32", "bf16"):
        if (precision, "runtime") in runs and ("bf16", "compiled") in runs:
            s, c = runs[(precision, "runtime")]["steady"], runs[("bf16", "compiled")]["steady"]
            print(f"{precision}, runtime ({runs[(precision, 'runtime')]['backend'] or 'not kept: torch'}) over bf16 "
                  f"compiled torch: {s[0] / c[0]:.2f}x wall, {s[1] / c[1]:.2f}x CPU time (target >= 1.4x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--naive-images", type=int, default=32)
    parser.add_argument("--photo", default="640x480", help="generated JPEG size, e.g. 4032x3024 for phone photos")
    parser.add_argument("--model", type=Path, default=OFFLINE)
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16", "int8"], choices=["fp32", "bf16", "int8"])
    parser.add_argument("--forms", nargs="+", default=["eager", "compiled", "runtime"],
                        choices=["eager", "compiled", "runtime"])
    parser.add_argument("--workers", type=int, default=None, help="decoding workers (default: as the command)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    global THREADS
    if args.threads:
        torch.set_num_threads(args.threads)
        THREADS = args.threads
    logging.basicConfig(level=logging.WARNING, format="  %(levelname)s %(name)s: %(message)s")
    warnings.filterwarnings("ignore", category=UserWarning)
    print(f"{cpu_model()}; /proc/loadavg {loadavg()}")
    print(f"torch {torch.__version__}, {THREADS} threads, {os.cpu_count()} CPUs, "
          f"load average at start {os.getloadavg()[0]:.1f}")
    size = tuple(int(v) for v in args.photo.split("x"))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        os.environ[backend.CACHE_ENV] = str(tmp / "cache")  # the runtime form converts in its first batch
        make_photos(tmp / "photos", args.images, size)
        prepare(PrepareConfig(source="folder", root=tmp / "photos", name="bench", val=0.0, test=0.0,
                              data_dir=tmp / "data"))
        dataset = load_dataset("bench", tmp / "data")
        encoder = load_image_encoder(str(model_folder(args.model, tmp)))
        paths = dataset.items["path"].tolist()
        batch = 32
        flops = flops_per_image(encoder)
        print(f"model {encoder.name}: {flops / 1e9:.2f} GFLOP per {encoder.image_size[0]} px picture; "
              f"{len(paths)} photos, {args.photo} JPEG", flush=True)
        b = bound(encoder, batch)
        decode = decode_rate(encoder, paths[:32])
        naive_rate = naive(encoder, paths[: args.naive_images])
        runs = {}
        for precision in args.precisions:
            for form in args.forms:
                if precision == "int8" and form == "eager":
                    continue  # torch's int8 runs compiled only; the runtime form tries the runtime's own int8
                runs[(precision, form)] = pipeline(dataset, encoder, precision, form, args.workers)
                print(f"  {precision}, {form} done, load average {os.getloadavg()[0]:.1f}", flush=True)
        report(b, flops, decode, naive_rate, runs, batch)
    print(f"load average at end {os.getloadavg()[0]:.1f}; /proc/loadavg {loadavg()}")


if __name__ == "__main__":
    main()
