"""FLOP/s of a tower method's training step (LoRA on DINOv2-S) against this machine's bf16 matmul rate.

A step is what `Stepper` runs for `--method lora --tower vision`: the adapted picture tower
forward over a batch of 224 px pictures (bf16 autocast, as `training_precision` picks on a CPU
with native bf16), a contrastive loss against fixed caption embeddings through a projection
head, backward into the LoRA matrices and the head, and an AdamW step. FLOPs per step are
counted with torch.utils.flop_counter (attention through SDPA's math form, so it is counted).
It runs twice: with the fused SDPA kernel (before) and with the matrix-product attention that
`mmret train` switches the towers to on a CPU (after, `use_matmul_attention`);
the bound is the dense bf16 matmul rate at the tower's linear-layer shapes for this batch, and at
a 2048^3 square, measured in the same run. Rates per wall second and per CPU second x threads.

    python benchmarks/tower_step.py [--batch 32] [--steps 3] [--rank 8] [--targets q,v] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import precompute  # noqa: E402
from precompute import OFFLINE, Meter, best_rate, model_folder, model_gemms, rates  # noqa: E402

from mmret.common.device import autocast_context  # noqa: E402
from mmret.encoders import load_image_encoder  # noqa: E402
from mmret.methods.config import LoraConfig  # noqa: E402
from mmret.methods.towers import LoraMethod  # noqa: E402
from mmret.models.tuners import use_matmul_attention  # noqa: E402
from mmret.training.losses import ClipLoss  # noqa: E402


def build(folder: Path, rank: int, targets: str, attention: str = "matmul"):
    encoder = load_image_encoder(str(folder))
    LoraMethod().adapt(encoder, LoraConfig(rank=rank, targets=targets, tower="vision"))
    if attention == "matmul":
        use_matmul_attention(encoder)  # as `mmret train` does on a CPU
    head = torch.nn.Linear(encoder.dim, 256)
    encoder.train()
    params = [p for p in list(encoder.parameters()) + list(head.parameters()) if p.requires_grad]
    return encoder, head, torch.optim.AdamW(params, lr=1e-4)


def step(encoder, head, optimizer, pixels, texts, precision: str) -> float:
    optimizer.zero_grad(set_to_none=True)
    with autocast_context(torch.device("cpu"), precision):
        images = torch.nn.functional.normalize(head(encoder(pixels).pooled).float(), dim=-1)
        loss = ClipLoss()(images, texts, torch.tensor(100.0))
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def step_flops(encoder, head, optimizer, pixels, texts, precision: str) -> float:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        step(encoder, head, optimizer, pixels, texts, precision)
    return float(counter.get_total_flops())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--targets", default="q,v")
    parser.add_argument("--precisions", nargs="+", default=["bf16", "fp32"])
    parser.add_argument("--model", type=Path, default=OFFLINE)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--attention", nargs="+", default=["sdpa", "matmul"], choices=["sdpa", "matmul"],
                        help="sdpa: the fused kernel (before); matmul: what `mmret train` uses on a CPU (after)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = precompute.THREADS = torch.get_num_threads()
    print(f"torch {torch.__version__}, {threads} threads, load average at start {os.getloadavg()[0]:.1f}")
    folder = model_folder(args.model, Path("/tmp"))
    encoder, head, optimizer = build(folder, args.rank, args.targets, "sdpa")
    gen = torch.Generator().manual_seed(0)
    pixels = torch.randn(args.batch, 3, *encoder.image_size, generator=gen)
    texts = torch.nn.functional.normalize(torch.randn(args.batch, 256, generator=gen), dim=-1)
    shapes = model_gemms(encoder, args.batch)
    flops_m, seconds = 0.0, [0.0, 0.0]
    print(f"\nbf16 matmul GFLOP/s at the tower's shapes, batch {args.batch} (wall / CPU-time):")
    for (m, k, n), count in sorted(shapes.items()):
        if m < args.batch * 2 or min(k, n) <= args.rank:
            continue  # the pooled head's and LoRA's rank-r products: under 1% of the FLOPs, and memory-bound
        a, b = torch.randn(m, k, dtype=torch.bfloat16), torch.randn(k, n, dtype=torch.bfloat16)
        r = best_rate(lambda: a @ b, 2 * m * k * n)
        flops_m += 2 * m * k * n * count
        seconds = [s + 2 * m * k * n * count / ri for s, ri in zip(seconds, r)]
        print(f"  {m} x {k} x {n} (x{count}): {r[0] / 1e9:.0f} / {r[1] / 1e9:.0f}")
    bound = tuple(flops_m / s for s in seconds)
    a = torch.randn(2048, 2048, dtype=torch.bfloat16)
    square = best_rate(lambda: a @ a, 2 * 2048**3)
    print(f"  the tower's GEMMs: {bound[0] / 1e9:.0f} / {bound[1] / 1e9:.0f}; 2048^3 square: "
          f"{square[0] / 1e9:.0f} / {square[1] / 1e9:.0f}")
    for attention in args.attention:
        if attention == "matmul":
            use_matmul_attention(encoder)
        for precision in args.precisions:
            measure(encoder, head, optimizer, pixels, texts, precision, attention, bound, args, threads)
    print(f"\nload average at end {os.getloadavg()[0]:.1f}")


def measure(encoder, head, optimizer, pixels, texts, precision, attention, bound, args, threads) -> None:
    flops = step_flops(encoder, head, optimizer, pixels, texts, precision)
    step(encoder, head, optimizer, pixels, texts, precision)  # warm
    best = (0.0, 0.0)
    for _ in range(args.steps):
        with Meter() as meter:
            step(encoder, head, optimizer, pixels, texts, precision)
        best = tuple(map(max, best, rates(flops, meter, threads)))
    print(f"\n{precision} step, {attention} attention, batch {args.batch}: {flops / 1e9:.0f} GFLOP; "
          f"{best[0] / 1e9:.0f} / {best[1] / 1e9:.0f} GFLOP/s (wall / CPU-time) = {best[0] / bound[0]:.2f} / "
          f"{best[1] / bound[1]:.2f} of the bf16 matmul rate at the tower's shapes; {flops / best[0]:.2f} s a step "
          f"(wall)", flush=True)


if __name__ == "__main__":
    main()
