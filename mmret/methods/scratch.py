"""`scratch`: a small CLIP trained from nothing on the dataset's own pairs.

`--arch miniclip` (MiniCLIP: a timm ResNet image tower, a Linformer text encoder, one projection
MLP shared by both), or `--arch clip-tiny` / `clip-b16` (a CLIP built from a config with random
weights). Text goes through a byte-pair tokenizer trained on the training captions (`--tokenizer
bpe`, saved in the run as `tokenizer.json`) or any transformers tokenizer (`--tokenizer ID`).
Pictures are resized to `--image-size`; training adds random flips unless captions say left/right.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from mmret.methods import register_method

TOKENIZER_FILE = "tokenizer.json"


@dataclass
class ScratchContext:
    tokenizer: Any  # BpeTokenizer or HfTokenizer: `.tokenize(texts, max_length)`, `.vocab_size`
    trained: bool  # a BPE tokenizer trained for this run (to be saved in it)


def training_captions(cfg: Any) -> list[str]:
    from mmret.datasets import load_dataset
    from mmret.pairs import run_splits

    dataset = run_splits(cfg, load_dataset(cfg.data.dataset, cfg.data.data_dir))
    return dataset.split("train").captions["caption"].tolist()


def context(cfg: Any, run_dir: Path | None = None) -> ScratchContext:
    from mmret.tokenizer import load_tokenizer, train_bpe

    if run_dir is not None and (run_dir / TOKENIZER_FILE).is_file():
        return ScratchContext(load_tokenizer(run_dir / TOKENIZER_FILE), False)
    if cfg.method.tokenizer == "bpe":
        return ScratchContext(train_bpe(training_captions(cfg), cfg.method.vocab_size), True)
    return ScratchContext(load_tokenizer(cfg.method.tokenizer), False)


def save_context(ctx: ScratchContext, run_dir: Path) -> None:
    if ctx.trained:
        ctx.tokenizer.save(run_dir / TOKENIZER_FILE)


def inputs_for(cfg: Any, ctx: ScratchContext, tables: Any) -> tuple[Any, Any, Any]:
    from torchvision import transforms as T

    from mmret.models.miniclip import IMAGENET_MEAN, IMAGENET_STD, image_transform
    from mmret.pairs import mentions_sides

    size = cfg.method.image_size
    hflip = cfg.train.hflip
    if hflip is None:
        hflip = tables is not None and not mentions_sides(tables.captions["caption"].tolist())
    train = T.Compose([T.Resize(size, interpolation=T.InterpolationMode.BICUBIC, antialias=True), T.CenterCrop(size)]
                      + ([T.RandomHorizontalFlip()] if hflip else [])
                      + [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    return train, image_transform(size), partial(ctx.tokenizer.tokenize, max_length=cfg.encoders.max_length)


@register_method("scratch", help="a small CLIP trained from scratch (MiniCLIP: ResNet + Linformer, or a random CLIP)",
                 inputs="pixels", lr=1e-3, context=context, inputs_for=inputs_for, save_context=save_context)
def build(cfg: Any, ctx: ScratchContext):
    m = cfg.method
    if m.arch != "miniclip":
        from mmret.models.scratch_clip import random_clip

        return random_clip(m.arch, ctx.tokenizer.vocab_size, cfg.encoders.max_length, m.embed_dim, m.image_size,
                           m.temperature, m.init_temperature)
    from mmret.models.miniclip import MiniCLIP, MiniCLIPConfig

    return MiniCLIP(MiniCLIPConfig(
        image_model=m.image_model, image_pretrained=m.pretrained_image, image_size=m.image_size,
        vocab_size=ctx.tokenizer.vocab_size, max_length=cfg.encoders.max_length, text_width=m.text_width,
        text_depth=m.text_depth, linformer_k=min(m.linformer_k, cfg.encoders.max_length), dropout=m.dropout,
        embed_dim=m.embed_dim, temperature=m.temperature, temperature_init=m.init_temperature))
