"""The probe-memory tables for a 6 GB GPU: which training configurations fit, and which one runs fastest.

Two setups, estimated on this machine without a GPU and without any weights: every tower is built
from its published config on the meta device and each candidate's training step runs on fake
tensors (`mmret.memory`):

  bridge       the querying bridge over cached DINO ViT-S/16 token states (timm
               vit_small_patch16_224, pretrained=False: 197 tokens x 384) and cached DistilBERT
               features (DistilBertConfig() defaults: 768); the towers never run in training
  lora r=64    recipe both-r64: LoRA r=64, alpha=128 on q, k and v of both towers of CLIP ViT-B/32
               (CLIPConfig with the ViT-B/32 values), the towers running at every step

Batch 128 pairs, the training defaults otherwise; the dataset is Flickr30k-sized, so the input
norms start from the full 4096-row sample. Every micro-batch (128 down to 1), fp32 and bf16 (fp16
keeps the same tensor sizes), and for LoRA gradient checkpointing off and on, are one row each.

    python benchmarks/memory_table.py [--vram 6]
"""

from __future__ import annotations

import argparse
import time

from mmret.errors import MmretError
from mmret.memory import CATEGORIES, MemoryReport, describe, needed, probe_memory
from mmret.methods.config import recipe_values
from mmret.runs import RunConfig, with_overrides

GB = 2**30
SETUPS = {
    "bridge over DINO ViT-S/16 + DistilBERT": dict(method="bridge", item="dino-vits16", text="distilbert"),
    "LoRA r=64 on CLIP ViT-B/32": dict(model="clip-b32", **recipe_values("both-r64")),
}


def config(options: dict) -> RunConfig:
    return with_overrides(RunConfig(), {"dataset": "flickr30k", "batch_size": 128, **options})


def format_report(title: str, report: MemoryReport) -> str:
    head = f"{'micro':>5} {'prec':>4} {'ckpt':>4} " + " ".join(f"{k[:11]:>11}" for k in CATEGORIES)
    lines = [f"{title}: {report.how.split(':')[0]}, budget {report.vram:g} GB, {report.usable / GB:.2f} GB usable",
             head + f" {'step':>7} {'eval':>7} {'setup':>7} {'peak in':>7} {'fits':>4}"]
    for r in report.rows:
        c, m = r.candidate, r.step
        cells = " ".join(f"{getattr(m, k) / GB:>11.3f}" for k in CATEGORIES)
        phases = " ".join(f"{r.phases[k] / GB:>7.3f}" for k in ("step", "eval", "setup"))
        fits = "best" if r is report.best else "yes" if r.fits else "no"
        lines.append(f"{c.micro_batch:>5} {c.precision:>4} {'on' if c.grad_checkpointing else 'off':>4} {cells} "
                     f"{phases} {r.phase:>7} {fits:>4}")
    best, tc = report.best, report.config.train
    lines.append("(GB = 2^30 bytes; the split is the training step's peak)")
    lines.append(f"recommended: {describe(best.candidate, report.batch_size)}, peak {best.peak / GB:.2f} GB "
                 f"({needed(best.peak) / GB:.2f} GB with the margin)")
    flags = f"--micro-batch {tc.micro_batch or tc.batch_size} --precision {tc.precision}"
    lines.append(f"  mmret train ... {flags}{' --grad-checkpointing' if tc.grad_checkpointing else ''}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vram", type=float, default=6.0, help="GPU memory budget in GB")
    args = parser.parse_args()
    for title, options in SETUPS.items():
        start = time.perf_counter()
        try:
            report = probe_memory(config(options), args.vram, how="estimate")
        except MmretError as e:
            print(f"{title}: {e}\n")
            continue
        print(format_report(title, report))
        print(f"({len(report.rows)} candidates estimated in {time.perf_counter() - start:.0f} s)\n")


if __name__ == "__main__":
    main()
