"""Pairs per second of a bridge epoch over cached features vs. the same epoch re-running the frozen
image tower on pixels, in one run and one precision.

Both paths train the same querying bridge with the same batches and optimizer step; the only
difference is where the image token states come from: the memory-mapped feature cache, or
decoding + resizing the pictures (DataLoader workers) and a forward pass of the frozen tower.
The feature cache is filled before timing (that is a one-off cost, shared by every later epoch
and run). Also prints the FLOPs of one pair on each path, which bound the ratio a perfect
implementation could reach.

    python benchmarks/train_speed.py --dataset tuxpaint --vision ~/.cache/mmret-offline/models/dinov2-small \
        --text ~/.cache/mmret-offline/models/all-minilm-l6-v2 --images 192
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

from mmret.common.progress import NULL
from mmret.data import load_dataset
from mmret.data.pairs import FileSource, epoch_batches
from mmret.methods import get_method
from mmret.runs import RunConfig, with_overrides
from mmret.training.gradcache import contrastive_step
from mmret.training.step import make_optimizer


def step(model, optimizer, images, texts):
    optimizer.zero_grad(set_to_none=True)
    loss = contrastive_step(model, images, texts, len(texts))
    optimizer.step()
    return float(loss)


def timed_epoch(model, optimizer, batches, images_of, texts_of) -> float:
    """Seconds for one pass over `batches`; `images_of(batch)` yields the bridge's image input."""
    start = time.perf_counter()
    for (_, cap_idx), images in zip(batches, images_of(batches)):
        step(model, optimizer, images, texts_of(cap_idx))
    return time.perf_counter() - start


def flops_per_pair(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def main() -> None:
    home = os.path.expanduser("~/.cache/mmret-offline/models")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="tuxpaint")
    parser.add_argument("--vision", default=f"{home}/dinov2-small")
    parser.add_argument("--text", default=f"{home}/all-minilm-l6-v2")
    parser.add_argument("--images", type=int, default=192, help="training pictures in the timed epoch")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--token-pool", type=int, nargs="+", default=[1, 2, 4],
                        help="bridge --token-pool settings to time (each with both paths)")
    parser.add_argument("--bridge", nargs="*", default=[], metavar="KEY=VALUE",
                        help="other bridge settings for every timing, e.g. queries=8 bridge_width=192")
    args = parser.parse_args()
    torch.manual_seed(0)
    extra = {k: int(v) for k, v in (o.split("=", 1) for o in args.bridge)}
    cfg = with_overrides(RunConfig(), dict(method="bridge", dataset=args.dataset, item=args.vision, text=args.text,
                                           batch_size=args.batch_size, **extra))
    dataset = load_dataset(args.dataset)
    method = get_method("bridge")
    context = method.open(cfg, dataset)
    (cached,) = method.sources(cfg, context, dataset, ("train",), torch.device("cpu"), NULL)
    n = min(args.images, cached.num_items)
    batches = [b for b in epoch_batches(cached.tables.captions_of, args.batch_size, 0, 0)]
    batches = [(i[i < n], c[i < n]) for i, c in batches]
    batches = [b for b in batches if len(b[0]) > 1]
    pairs = sum(len(b[0]) for b in batches)

    encoder = context.image.with_weights().eval()
    pixels = FileSource(cached.tables, encoder.item_loader(), encoder.item_loader(), None, workers=args.workers)
    texts_of = cached.text_batch

    def tower_tokens(bs):
        keys = [[(0, int(i)) for i in b[0]] for b in bs]
        for batch in pixels._loader(pixels.eval_items, keys):
            with torch.inference_mode():
                tokens = encoder(batch).tokens
            yield tokens.clone()

    def cached_tokens(bs):
        return (cached.item_batch(b[0]) for b in bs)

    b = args.batch_size
    with torch.inference_mode():
        tower_flops = flops_per_pair(lambda: encoder(torch.zeros(b, 3, *encoder.image_size))) / b
    print(f"dataset {args.dataset}: {pairs} pairs in {len(batches)} batches of <= {b}, "
          f"{torch.get_num_threads()} threads, fp32; frozen tower forward {tower_flops / 1e9:.2f} GFLOP per pair; "
          f"bridge: queries {cfg.method.queries}, layers {cfg.method.bridge_layers}, width {cfg.method.bridge_width}")
    for pool in args.token_pool:
        bridge_cfg = with_overrides(cfg, {"token_pool": pool})

        def fresh():
            torch.manual_seed(0)
            model = method.build(bridge_cfg, context)
            return model, make_optimizer(model, 5e-4, 0.05)

        model, opt = fresh()
        timed_epoch(model, opt, batches[:1], cached_tokens, texts_of)  # warm-up
        model, opt = fresh()
        t_cached = timed_epoch(model, opt, batches, cached_tokens, texts_of)
        model, opt = fresh()
        t_pixels = timed_epoch(model, opt, batches, tower_tokens, texts_of)
        one = cached.item_batch(np.arange(b)), cached.text_batch(np.arange(b))
        model, opt = fresh()
        bridge_flops = flops_per_pair(lambda: contrastive_step(model, one[0], one[1], b)) / b
        print(f"--token-pool {pool}: bridge step {bridge_flops / 1e9:.2f} GFLOP per pair")
        print(f"  cached features: {t_cached:7.2f} s  {pairs / t_cached:8.1f} pairs/s")
        print(f"  tower on pixels: {t_pixels:7.2f} s  {pairs / t_pixels:8.1f} pairs/s  "
              f"(decode + resize in {args.workers} workers, frozen forward)")
        print(f"  ratio: {t_pixels / t_cached:.1f}x (target >= 50x); FLOP bound before decoding "
              f"{(bridge_flops + tower_flops) / bridge_flops:.1f}x")


if __name__ == "__main__":
    main()
