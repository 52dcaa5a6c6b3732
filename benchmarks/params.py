"""Parameter counts of CLIP ViT-B/32 and ViT-B/16 under every method that adapts the towers.

For each architecture and method the two CLIP towers (as mmret loads them:
`CLIPVisionModelWithProjection`, `CLIPTextModelWithProjection`) are built on the meta device from
the presets' published configs, so no weights are read or downloaded, adapted with the method's
`tune_model` exactly as training adapts them, joined in a `DualEncoder` (which adds the learned temperature)
and counted per part with `mmret.models.dual.parameter_table`. The methods:

  lora text-r8   recipe text-r8: LoRA r=8, alpha=16 on q and v of the text tower
  lora both-r64  recipe both-r64: LoRA r=64, alpha=128 on q, k and v of both towers
  prefix         16 prompt tokens at the input of every block of both towers
  adapter        bottleneck adapters of width 64 after attention and MLP in every block, both towers
  full           every tower weight trains

The config values are those of openai/clip-vit-base-patch32 and -patch16 (the `clip-b32` and
`clip-b16` presets of `mmret.encoders.presets`); the two differ only in the patch size.

    python benchmarks/params.py
"""

from __future__ import annotations

import torch
from torch import nn

from mmret.encoders import load_image_encoder, load_text_encoder
from mmret.methods import MethodConfig, config_for, get_method, recipe_values
from mmret.models.dual import DualEncoder, PartCount, parameter_table
from mmret.models.temperature import build_temperature
from mmret.models.tuners import covers

PRESET = {"ViT-B/32": "clip-b32", "ViT-B/16": "clip-b16"}
EMBED_DIM = 512


def settings() -> dict[str, tuple[str, MethodConfig]]:
    """label -> (method, its config)."""
    return {
        "lora text-r8": ("lora", config_for("lora", **recipe_values("text-r8"))),
        "lora both-r64": ("lora", config_for("lora", **recipe_values("both-r64"))),
        "prefix": ("prefix", config_for("prefix")),
        "adapter": ("adapter", config_for("adapter")),
        "full": ("full", config_for("full")),
    }


def clip_towers(arch: str) -> tuple[nn.Module, nn.Module]:
    """The frozen image and text models of CLIP `arch` (the preset's published architecture), on
    the meta device (no memory, no weights)."""
    image = load_image_encoder(PRESET[arch], meta=True).model
    text = load_text_encoder(PRESET[arch], meta=True, max_length=77).model
    return image, text


def adapted_clip(arch: str, method: str, cfg: MethodConfig) -> DualEncoder:
    """Both towers of `arch` with `method` applied to the towers `cfg.tower` covers."""
    towers = dict(zip(("image", "text"), clip_towers(arch)))
    tuner = get_method(method)
    for modality, model in towers.items():
        if covers(tuner.adapted_tower(cfg), modality):
            tuner.tune_model(model, modality, cfg)
    with torch.device("meta"):
        temperature = build_temperature("learned")
    return DualEncoder(towers["image"], towers["text"], EMBED_DIM, temperature)


def tower_trainable(model: DualEncoder) -> int:
    """Trainable parameters inside the two towers (the temperature not counted)."""
    return sum(p.numel() for tower in (model.item_tower, model.text_tower)
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
    for arch in PRESET:
        print(format_table(arch, tables(arch)), end="\n\n")
    method, cfg = settings()["lora both-r64"]
    n = tower_trainable(adapted_clip("ViT-B/16", method, cfg))
    expected = 12 * 3 * 64 * (768 + 768) + 12 * 3 * 64 * (512 + 512)
    print(f"LoRA r=64 on q, k, v of both CLIP ViT-B/16 towers: {n:,} trainable parameters "
          f"(12 x 3 x 64 x (768+768) + 12 x 3 x 64 x (512+512) = {expected:,})")


if __name__ == "__main__":
    main()
