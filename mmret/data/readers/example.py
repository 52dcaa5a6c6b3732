"""The built-in `example` dataset: pictures of two coloured shapes with captions that say where
each one is ("a red circle above a blue square"), generated on the spot with no download.

Every picture shows a different scene (two of 18 colour-shape pairs, one above or left of the
other) with a little jitter in size and place, and five captions that describe it in different
words. The same seed always gives the same pictures, captions and splits.
"""

from __future__ import annotations

import itertools
import random
from pathlib import Path

from PIL import Image, ImageDraw

from mmret.data.readers.base import ItemRecord, SourceData
from mmret.data.readers.registry import register_reader
from mmret.errors import MmretError

COLORS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
    "yellow": (235, 200, 30), "purple": (140, 60, 180), "orange": (245, 140, 30),
}
SHAPES = ("circle", "square", "triangle")
SIZE = 64  # pixels per side: small enough for a CPU to train on in minutes
RELATIONS = {  # relation: (opposite, words for first/second in a "then" caption)
    "above": ("below", "on top", "at the bottom"),
    "left of": ("right of", "on the left", "on the right"),
}


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, color: tuple, cx: float, cy: float, r: float) -> None:
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        draw.ellipse(box, fill=color)
    elif shape == "square":
        draw.rectangle(box, fill=color)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=color)


def render(first: tuple[str, str], second: tuple[str, str], relation: str, rng: random.Random) -> Image.Image:
    """`first` (colour, shape) placed `relation` `second`, on a light background."""
    shade = rng.randint(235, 255)
    img = Image.new("RGB", (SIZE, SIZE), (shade, shade, shade))
    draw = ImageDraw.Draw(img)
    near, far = SIZE * 0.27, SIZE * 0.73
    across = [SIZE * rng.uniform(0.3, 0.7) for _ in range(2)]
    for (color, shape), along, side in zip((first, second), (near, far), across):
        along += rng.uniform(-3, 3)
        cx, cy = (side, along) if relation == "above" else (along, side)
        draw_shape(draw, shape, COLORS[color], cx, cy, SIZE * rng.uniform(0.13, 0.19))
    return img


def _an(noun: str) -> str:
    return ("an " if noun[0] in "aeiou" else "a ") + noun


def captions_for(first: tuple[str, str], second: tuple[str, str], relation: str) -> list[str]:
    a, b = " ".join(first), " ".join(second)
    opposite, first_word, second_word = RELATIONS[relation]
    over, under = ("over", "under") if relation == "above" else ("to the left of", "to the right of")
    return [
        f"{_an(a)} {relation} {_an(b)}",
        f"{_an(b)} {opposite} {_an(a)}",
        f"a picture of {_an(a)} {over} {_an(b)}",
        f"there is {_an(b)} {under} {_an(a)}",
        f"{a} {first_word}, {b} {second_word}",
    ]


def scenes(count: int, seed: int) -> list[tuple]:
    """`count` distinct scenes (first item, second item, relation), drawn without replacement."""
    items = list(itertools.product(COLORS, SHAPES))
    every = [(a, b, rel) for a, b in itertools.permutations(items, 2) for rel in RELATIONS]
    if count > len(every):
        raise MmretError(f"--count can be at most {len(every)} for the example dataset (distinct scenes), got {count}")
    return random.Random(seed).sample(every, count)


@register_reader("example")
def read_example(root: Path, cfg) -> SourceData:
    """Draw the pictures into `root/images/` (the dataset's own folder) and caption them."""
    out = root / "images"
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(cfg.seed)
    records = []
    for i, (first, second, relation) in enumerate(scenes(cfg.count, cfg.seed)):
        name = f"{i:05d}.png"
        render(first, second, relation, rng).save(out / name)
        records.append(ItemRecord(f"{i:05d}", f"images/{name}", captions_for(first, second, relation)))
    note = f"seeded random split (seed {cfg.seed}): val {cfg.val:g}, test {cfg.test:g} of the images"
    files = [f"{len(records)} generated pictures"]
    return SourceData(records, files, note, split_sizes=(cfg.val, cfg.test))
