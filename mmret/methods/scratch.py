"""`scratch`: a small CLIP trained from nothing on the dataset's own pairs.

`--arch miniclip` (MiniCLIP: a timm ResNet image tower, a Linformer text encoder, one projection
MLP shared by both), or `--arch clip-tiny` / `clip-b16` (a CLIP built from a config with random
weights). Text goes through a byte-pair tokenizer trained on the training captions (`--tokenizer
bpe`, saved in the run as `tokenizer.json`) or any transformers tokenizer (`--tokenizer ID`).
Pictures are resized to `--image-size`; training adds random flips unless captions say left/right.
Both towers are picture and text models: the dataset must hold pictures.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import torch

from mmret.data.pairs import FileSource, mentions_sides, split_tables
from mmret.data.prepared import load_dataset, run_tables
from mmret.errors import MmretError
from mmret.methods.base import SIDES, Inputs, Method
from mmret.methods.config import ScratchConfig
from mmret.methods.registry import register_method
from mmret.modalities.base import ItemLoader
from mmret.modalities.image import load_rgb

TOKENIZER_FILE = "tokenizer.json"


@dataclass
class ScratchContext:
    tokenizer: Any  # BpeTokenizer or HfTokenizer: `.tokenize(texts, max_length)`, `.vocab_size`
    trained: bool  # a BPE tokenizer trained for this run (to be saved in it)


class ScratchMethod(Method):
    name = "scratch"
    lr = 1e-3
    config = ScratchConfig
    runs_towers = True
    towers = False  # both towers are trained from nothing

    def open(self, cfg: Any, dataset: Any = None, run_dir: Any = None, *, weights: bool = True,
             need: tuple[str, ...] = SIDES) -> ScratchContext:
        """The run's tokenizer: saved in the run, trained on the training captions of `dataset`,
        or a transformers one; without a dataset or run, a stand-in of the configured size."""
        from mmret.data.tokenizer import load_tokenizer, train_bpe

        m = cfg.method
        if run_dir is not None and (Path(run_dir) / TOKENIZER_FILE).is_file():
            return ScratchContext(load_tokenizer(Path(run_dir) / TOKENIZER_FILE), False)
        if m.tokenizer != "bpe":
            return ScratchContext(load_tokenizer(m.tokenizer), False)
        if dataset is None:  # shapes only (memory probing): a vocabulary of the configured size
            return ScratchContext(SimpleNamespace(vocab_size=m.vocab_size), False)
        captions = split_tables(run_tables(cfg, dataset), "train").captions
        return ScratchContext(train_bpe(captions, m.vocab_size), True)

    def save(self, ctx: ScratchContext, run_dir: Any) -> None:
        if ctx.trained:
            ctx.tokenizer.save(Path(run_dir) / TOKENIZER_FILE)

    def _loaders(self, cfg: Any, hflip: bool) -> tuple[ItemLoader, ItemLoader]:
        from torchvision import transforms as T

        from mmret.encoders.preprocess import ImagePreprocess, ImageTransform, resize_and_crop
        from mmret.models.miniclip import IMAGENET_MEAN, IMAGENET_STD

        size = cfg.method.image_size
        train = T.Compose(resize_and_crop(size, (size, size), T.InterpolationMode.BICUBIC)
                          + ([T.RandomHorizontalFlip()] if hflip else [])
                          + [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
        # evaluation: resize, centre crop, ImageNet statistics (MiniCLIP's `image_transform`), as numbers exports read
        pre = ImagePreprocess((size, size), size, "bicubic", IMAGENET_MEAN, IMAGENET_STD, "scratch")
        return ItemLoader(load_rgb, train), ItemLoader(load_rgb, ImageTransform(pre))

    def _tokenize(self, cfg: Any, ctx: ScratchContext) -> Callable:
        return partial(ctx.tokenizer.tokenize, max_length=cfg.encoders.max_length)

    def sources(self, cfg: Any, ctx: ScratchContext, dataset: Any, splits: tuple[str, ...], device: torch.device,
                reporter: Any) -> list[Any]:
        if dataset.modality.name != "image":
            raise MmretError(f"--method scratch trains a picture model; dataset {dataset.name!r} holds "
                             f"{dataset.modality.plural}: use heads, bridge or a tower method")
        tables = run_tables(cfg, dataset)
        hflip = cfg.train.hflip
        if hflip is None:
            hflip = not mentions_sides(tables.captions["caption"].tolist())
        train, evaluation = self._loaders(cfg, hflip)
        return [FileSource(split_tables(tables, s), train, evaluation, self._tokenize(cfg, ctx), cfg.train.seed,
                           cfg.train.workers, device.type == "cuda") for s in splits]

    def build(self, cfg: Any, ctx: ScratchContext):
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

    def query_loader(self, cfg: Any, ctx: ScratchContext) -> ItemLoader:
        return self._loaders(cfg, hflip=False)[1]

    def tokenizer(self, cfg: Any, ctx: ScratchContext) -> Any:
        return self._tokenize(cfg, ctx)

    def standalone_tokenizer(self, cfg: Any, ctx: ScratchContext) -> Any:
        return ctx.tokenizer.standalone(cfg.encoders.max_length)

    def item_input(self, cfg: Any, ctx: ScratchContext) -> str:
        return "pixels"

    def vocabulary(self, cfg: Any, ctx: ScratchContext) -> set[str] | None:
        """The words of the training captions, which are all the text tower ever read (None when
        the run's dataset is gone)."""
        from mmret.data.tokenizer import words

        try:
            captions = split_tables(run_tables(cfg, load_dataset(cfg.data.dataset, cfg.data.data_dir)), "train")
        except MmretError:
            return None
        return {w for caption in captions.captions for w in words(caption)}

    def input_shapes(self, cfg: Any, ctx: ScratchContext, num_tokens: Callable) -> Inputs:
        m = cfg.method
        return Inputs((3, m.image_size, m.image_size), None, cfg.encoders.max_length, ctx.tokenizer.vocab_size)

    def shapes_config(self, cfg: Any) -> Any:
        import dataclasses

        return dataclasses.replace(cfg, method=dataclasses.replace(cfg.method, pretrained_image=False))

    def memory_cuts(self, cfg: Any) -> list[str]:
        return ["a shorter --max-length", "a smaller --arch"]


register_method(ScratchMethod())
