"""Time and peak memory of evaluating a COCO-5K-sized test: 5000 images x 25010 captions, 512-d.

Prints, for `retrieval_metrics` on float16 embeddings (as `runs/<run>/embeddings/` holds them):
  time         wall time of the whole evaluation (both directions, all metrics), best of --rounds,
               then of `bootstrap_ci` with 1000 resamples (target: evaluation < 10 s);
  peak memory  the process's peak resident memory during the evaluation minus its resident memory
               with the embeddings loaded (target < 1 GB over the embeddings themselves);
and, as a check that the work is real, the metrics it computed. The chunked evaluation is compared
with the same metrics computed from the full score matrix (`metrics_from_scores`).

The embeddings are synthetic: captions are noisy copies of their image's embedding, so recalls
land in the range of real models. The measurement runs in a fresh child process so that nothing
allocated before (generating the data) counts in its peak. The machine's 2 cores may be shared:
the load average is printed so the numbers can be judged.

    python benchmarks/eval.py [--images 5000] [--captions 25010] [--dim 512] [--rounds 2]
"""

from __future__ import annotations

import os

# Shared cores: OpenMP threads that spin-wait for a preempted partner waste the time they wait
# (see benchmarks/search.py); sleeping waiters avoid it. Set before torch loads OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402


def make_embeddings(folder: Path, n_items: int, n_captions: int, dim: int, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    images = torch.nn.functional.normalize(torch.randn(n_items, dim, generator=g), dim=1)
    per = n_captions // n_items  # COCO: 5 per image, a few images with 6 or 7
    extra = torch.randint(n_items, (n_captions - per * n_items,), generator=g)
    text_item = torch.cat([torch.arange(n_items).repeat_interleave(per), extra])
    noise = torch.randn(n_captions, dim, generator=g) * 5.5 / dim**0.5  # |noise| ~ 5.5: R@1 near 50%
    texts = torch.nn.functional.normalize(images[text_item] + noise, dim=1)
    np.save(folder / "image.npy", images.half().numpy())
    np.save(folder / "text.npy", texts.half().numpy())
    np.save(folder / "text_item.npy", text_item.numpy())


def _memory_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def child(folder: Path, rounds: int) -> None:
    """Runs in a fresh process: load, reset the peak, evaluate, report JSON on stdout."""
    from mmret.metrics.retrieval import bootstrap_ci, metrics_from_scores, retrieval_metrics

    image = torch.from_numpy(np.load(folder / "image.npy"))
    text = torch.from_numpy(np.load(folder / "text.npy"))
    text_item = torch.from_numpy(np.load(folder / "text_item.npy"))
    torch.zeros(1) @ torch.zeros(1, 1)  # load BLAS before the baseline
    base_kb = _memory_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current size
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        result = retrieval_metrics(image, text, text_item)
        times.append(time.perf_counter() - t0)
    peak_kb = _memory_kb("VmHWM")
    t0 = time.perf_counter()
    ci = bootstrap_ci(result, n_boot=1000, seed=0)
    boot = time.perf_counter() - t0
    full = metrics_from_scores(text.float() @ image.float().T, text_item)  # the unchunked reference
    same = all(abs(full.metrics[k] - v) < 1e-12 for k, v in result.metrics.items())
    print(json.dumps({"times": times, "boot_s": boot, "base_mb": base_kb / 1024, "extra_mb": (peak_kb - base_kb) / 1024,
                      "emb_mb": (image.nbytes + text.nbytes) / 2**20, "metrics": result.metrics,
                      "rsum_ci": ci["rsum"], "same_as_full_matrix": same}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--captions", type=int, default=25010)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.rounds)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, OMP_WAIT_POLICY="
          f"{os.environ.get('OMP_WAIT_POLICY')}, load average {os.getloadavg()}")
    with tempfile.TemporaryDirectory() as tmp:
        make_embeddings(Path(tmp), args.images, args.captions, args.dim)
        out = subprocess.run([sys.executable, __file__, "--child", tmp, "--rounds", str(args.rounds)],
                             check=True, capture_output=True, text=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    m = r["metrics"]
    print(f"{args.images} images x {args.captions} captions x {args.dim}-d float16 "
          f"({r['emb_mb']:.0f} MB of embeddings, process at {r['base_mb']:.0f} MB before)")
    print(f"evaluation: {min(r['times']):.2f} s (runs: {', '.join(f'{t:.2f}' for t in r['times'])}); "
          f"peak memory {r['extra_mb']:.0f} MB over the loaded embeddings")
    print(f"bootstrap_ci, 1000 resamples: {r['boot_s']:.2f} s; RSUM {m['rsum']:.1f} "
          f"[{r['rsum_ci'][0]:.1f}, {r['rsum_ci'][1]:.1f}]")
    print("t2i R@1/5/10 {:.3f}/{:.3f}/{:.3f} MedR {:.0f}; i2t R@1/5/10 {:.3f}/{:.3f}/{:.3f} mAP {:.3f}".format(
        m["t2i_r1"], m["t2i_r5"], m["t2i_r10"], m["t2i_medr"], m["i2t_r1"], m["i2t_r5"], m["i2t_r10"], m["i2t_map"]))
    print(f"chunked metrics equal the full-matrix ones: {r['same_as_full_matrix']}")
    print(f"load average at the end {os.getloadavg()}")


if __name__ == "__main__":
    main()
