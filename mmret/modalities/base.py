"""The `Modality` record and its registry (see the package docstring)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from mmret.errors import MmretError


class ItemError(Exception):
    """An item file that cannot be used; the message is the reason."""


@dataclass(frozen=True)
class Modality:
    name: str  # image
    plural: str  # images: the name of the item table and of its feature caches
    short: str  # i: metric names say t2i / i2t
    noun: str  # picture: how messages name one item
    unit: str  # img: the unit of progress bars
    extensions: tuple[str, ...]  # file endings (lower case, with the dot)
    probe: Callable[[Path, bool], dict[str, int]]  # (path, decode fully) -> table columns, or ItemError
    decode: Callable[[Path], Any]  # path -> the decoded item (a PIL picture), or ItemError
    columns: tuple[str, ...]  # the columns `probe` fills in the item table
    results_sheet: Callable[..., None] | None = None  # ([(title, [SheetItem])], path): results for people to look at
    # (path, size) -> an (H, W, 3) uint8 picture of the item at most size pixels a side, for
    # embedding maps and failure galleries (a sound may draw its spectrogram); or ItemError
    thumbnail: Callable[[Path, int], Any] | None = None

    def is_item_file(self, name: str) -> bool:
        return name.lower().endswith(self.extensions) and not name.startswith(".")


MODALITIES: dict[str, Modality] = {}


def register_modality(modality: Modality) -> Modality:
    MODALITIES[modality.name] = modality
    return modality


def get_modality(name: str | None) -> Modality:
    """The modality called `name` (None: image, the modality of datasets that do not say)."""
    name = name or "image"
    if name not in MODALITIES:
        raise MmretError(f"unknown modality {name!r}; mmret knows {', '.join(MODALITIES)}")
    return MODALITIES[name]



@dataclass(frozen=True)
class SheetItem:
    """One result on a results sheet: the item's file, the lines under it, and a mark."""

    path: str
    label: list[str]  # e.g. "#1  0.986  00446", then captions
    mark: str | None = None  # right | wrong | None (not known)


@dataclass(frozen=True)
class ItemLoader:
    """path -> model input: decode the file, then transform it. Picklable when both parts are,
    so DataLoader workers can run it."""

    decode: Callable[[Path], Any]
    transform: Callable[[Any], Any]

    def __call__(self, path: str | Path) -> Any:
        return self.transform(self.decode(path))
