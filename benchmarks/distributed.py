"""What training on several processes costs: step time and pairs/s of one process against two
(gloo on this machine's CPU), the overhead of the embedding all-gather + DDP's gradient all-reduce
as a ratio, and, from the formula, the bytes one step moves for a large batch on a cluster.

The model is the `heads` method at a realistic size: MLP heads from 768-d frozen features (ViT-B,
BERT-base widths) to a 512-d embedding space, over a global batch of `--batch` pairs. Three timings:

- 1 process over the whole global batch (all cores);
- 2 processes, each over its half, with the gather and DDP (`mmret.training.world`, `ClipLoss`);
- 2 processes, each over its half, WITHOUT any communication (plain local loss, no DDP): the
  same compute, so dist / local is the price of the gather and the all-reduce.

The two processes share this machine's cores (one thread each), so 1-vs-2 says little about a
real cluster; the dist/local ratio and the bytes are what carry over.

    python benchmarks/distributed.py --batch 512 --steps 20
"""

from __future__ import annotations

import argparse
import os
import socket
import tempfile
import time

import torch
import torch.multiprocessing as mp

IN_DIM, EMBED = 768, 512


def make(batch: int, seed: int = 0, world=None):
    from mmret.models import DualEncoder, ProjectionHead
    from mmret.runs.config import TrainConfig
    from mmret.training.session import run_loss
    from mmret.training.step import Stepper, make_optimizer
    from mmret.training.world import World

    torch.manual_seed(seed)
    world = world or World()
    model = DualEncoder(ProjectionHead(IN_DIM, EMBED, 2), ProjectionHead(IN_DIM, EMBED, 2), EMBED)
    cfg = TrainConfig(batch_size=batch, warmup=0.0)
    opt = make_optimizer(model, 1e-3, 0.05)
    return Stepper(model=model, optimizer=opt, train=cfg, peak_lr=1e-3, total_steps=10_000, device=torch.device("cpu"),
                   precision="fp32", scaler=torch.amp.GradScaler("cpu", enabled=False), loss=run_loss(cfg, world),
                   world=world)


def data(batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(batch, IN_DIM, generator=g), torch.randn(batch, IN_DIM, generator=g)


def time_steps(stepper, images, texts, steps: int, warmup: int = 3) -> float:
    for i in range(warmup):
        stepper(images, texts, i)
    start = time.perf_counter()
    for i in range(steps):
        stepper(images, texts, warmup + i)
    return (time.perf_counter() - start) / steps


def _rank(rank: int, port: int, batch: int, steps: int, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    from mmret.training import world as d

    world = d.start_world("cpu")
    images, texts = data(batch)
    mine = world.part(batch)
    images, texts = images[mine], texts[mine]
    stepper = make(batch, world=world)
    dist_t = time_steps(stepper, images, texts, steps)
    local = make(batch)  # same compute on the half batch, no gather, no DDP
    local_t = time_steps(local, images, texts, steps)
    world.barrier()
    if rank == 0:
        with open(out, "w") as f:
            f.write(f"{dist_t} {local_t}")
    d.stop_world(world)


def gathered_bytes(batch: int, dim: int, ranks: int, bytes_per: int) -> tuple[float, float]:
    """Per process and step: bytes received by the all-gather of image and text embeddings
    (forward), and sent again as their gradients (backward: a reduce-scatter of the same size)."""
    per = 2 * batch * dim * bytes_per * (ranks - 1) / ranks  # two towers, everyone's rows but one's own
    return per, per


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=512, help="global batch (pairs in one loss)")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()

    threads = torch.get_num_threads()
    one = make(args.batch)
    images, texts = data(args.batch)
    one_t = time_steps(one, images, texts, args.steps)
    torch.set_num_threads(1)
    one_1t = time_steps(make(args.batch), images, texts, args.steps)
    torch.set_num_threads(threads)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "t")
        mp.spawn(_rank, args=(port, args.batch, args.steps, out), nprocs=2, join=True)
        dist_t, local_t = map(float, open(out).read().split())
    print(f"heads {IN_DIM}->{EMBED} (MLP), global batch {args.batch}, fp32, CPU (noisy: shared machine)")
    print("| setting | step (ms) | pairs/s |\n|---|---|---|")
    print(f"| 1 process, {threads} threads, whole batch | {one_t * 1e3:.1f} | {args.batch / one_t:,.0f} |")
    print(f"| 1 process, 1 thread, whole batch | {one_1t * 1e3:.1f} | {args.batch / one_1t:,.0f} |")
    print(f"| 2 processes (gloo), 1 thread each, gather + DDP | {dist_t * 1e3:.1f} | {args.batch / dist_t:,.0f} |")
    print(f"| 2 processes, 1 thread each, no communication | {local_t * 1e3:.1f} | {args.batch / local_t:,.0f} |")
    print(f"2 processes / 1 process pairs/s: {one_t / dist_t:.2f}x ({threads} threads), "
          f"{one_1t / dist_t:.2f}x (1 thread)")
    print(f"gather + DDP overhead (2 processes with / without communication): {dist_t / local_t:.2f}x step time")
    print("\nembedding all-gather per step, from the formula 2 x B x D x bytes x (N-1)/N per process "
          "(forward; the backward sends as much again as gradients):")
    print("| batch | dim | precision | processes | per process, forward | per process, fwd + bwd "
          "| whole cluster, fwd + bwd |")
    print("|---|---|---|---|---|---|---|")
    for name, size in (("fp16", 2), ("fp32", 4)):
        for ranks in (8, 64):
            fwd, bwd = gathered_bytes(32768, 512, ranks, size)
            print(f"| 32768 | 512 | {name} | {ranks} | {fwd / 2**20:,.0f} MiB | {(fwd + bwd) / 2**20:,.0f} MiB | "
                  f"{(fwd + bwd) * ranks / 2**30:,.1f} GiB |")


if __name__ == "__main__":
    main()
