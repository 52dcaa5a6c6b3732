"""Parameter counts of CLIP ViT-B/32 and ViT-B/16 under every method that adapts the towers.

For each architecture and method the two CLIP towers (as mmret loads them:
`CLIPVisionModelWithProjection`, `CLIPTextModelWithProjection`) are built on the meta device from
their configs, so no weights are read or downloaded, adapted with `mmret.adapters.adapt_model`
exactly as training adapts them, joined in a `DualEncoder` (which adds the learned temperature)
and counted per part with `mmret.models.dual.parameter_table`. The methods:

  lora text-r8   recipe text-r8: LoRA r=8, alpha=16 on q and v of the text tower
  lora both-r64  recipe both-r64: LoRA r=64, alpha=128 on q, k and v of both towers
  prefix         16 prompt tokens at the input of every block of both towers
  adapter        bottleneck adapters of width 64 after attention and MLP in every block, both towers
  full           every tower weight trains

The config values are those of openai/clip-vit-base-patch32 and -patch16 (also transformers'
CLIPVisionConfig / CLIPTextConfig defaults); the two differ only in the patch size.

    python benchmarks/params.py
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from mmret.adapters import adapt_model, apply_recipe, covers
from mmret.config import MethodConfig
from mmret.models.dual import DualEncoder, PartCount, parameter_table
from mmret.models.temperature import build_temperature

VISION = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              image_size=224, projection_dim=512)
TEXT = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
            num_attention_heads=8, max_position_embeddings=77, projection_dim=512)
PATCH = {"ViT-B/32": 32, "ViT-B/16": 16}
EMBED_DIM = 512


def settings() -> dict[str, tuple[str, MethodConfig]]:
    """label -> (method, its MethodConfig)."""
    base = MethodConfig()
    return {
        "lora text-r8": ("lora", apply_recipe(base, "text-r8")),
        "lora both-r64": ("lora", apply_recipe(base, "both-r64")),
        "prefix": ("prefix", dataclasses.replace(base, method="prefix")),
        "adapter": ("adapter", dataclasses.replace(base, method="adapter")),
        "full": ("full", dataclasses.replace(base, method="full")),
    }


def clip_towers(arch: str) -> tuple[nn.Module, nn.Module]:
    """The frozen image and text towers of CLIP `arch`, on the meta device (no memory, no weights)."""
    from transformers import (
        CLIPTextConfig, CLIPTextModelWithProjection, CLIPVisionConfig, CLIPVisionModelWithProjection,
    )

    with torch.device("meta"):
        image = CLIPVisionModelWithProjection(CLIPVisionConfig(patch_size=PATCH[arch], **VISION))
        text = CLIPTextModelWithProjection(CLIPTextConfig(**TEXT))
    return image.requires_grad_(False), text.requires_grad_(False)


def adapted_clip(arch: str, method: str, cfg: MethodConfig) -> DualEncoder:
    """Both towers of `arch` with `method` applied to the towers `cfg.tower` covers."""
    towers = dict(zip(("image", "text"), clip_towers(arch)))
    for modality, model in towers.items():
        if covers(cfg.tower, modality):
            adapt_model(model, modality, method, cfg)
    with torch.device("meta"):
        temperature = build_temperature("learned")
    return DualEncoder(towers["image"], towers["text"], EMBED_DIM, temperature)


def tower_trainable(model: DualEncoder) -> int:
    """Trainable parameters inside the two towers (the temperature not counted)."""
    return sum(p.numel() for tower in (model.image_tower, model.text_tower)
               for p in tower.parameters() if p.requires_grad)


def tables(arch: str) -> dict[str, list[PartCount]]:
    return {label: parameter_table(adapted_clip(arch, method, cfg)) for label, (method, cfg) in settings().items()}


def format_table(arch: str, rows: dict[str, list[PartCount]]) -> str:
    lines = [f"CLIP {arch}", f"{'method':<15}{'part':<13}{'total':>14}{'trainable':>14}{'%':>9}"]
    for label, counts in rows.items():
        for c in counts:
            lines.append(f"{label:<15}{c.part:<13}{c.total:>14,}{c.trainable:>14,}{c.percent_trainable:>9.3f}")
    return "\n".join(lines)


def main() -> None:
    for arch in PATCH:
        print(format_table(arch, tables(arch)), end="\n\n")
    method, cfg = settings()["lora both-r64"]
    n = tower_trainable(adapted_clip("ViT-B/16", method, cfg))
    expected = 12 * 3 * 64 * (768 + 768) + 12 * 3 * 64 * (512 + 512)
    print(f"LoRA r=64 on q, k, v of both CLIP ViT-B/16 towers: {n:,} trainable parameters "
          f"(12 x 3 x 64 x (768+768) + 12 x 3 x 64 x (512+512) = {expected:,})")


if __name__ == "__main__":
    main()
