"""The `Modality` record and its registry, which takes each name once (see the package docstring)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

from mmret.common.items import MemberError, open_item
from mmret.common.paths import Roots, UnsafePath
from mmret.common.registry import Registry
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
    # both take a Path or an open binary file (a member of a tar shard: see mmret.common.items). `probe`
    # may add "notes" to the columns: (kind, reason) about a file that is kept (a sound mixed down
    # from 8 channels), one line each in prepare's summary
    probe: Callable[[Any, bool], dict[str, Any]]  # (file, decode fully) -> table columns, or ItemError
    decode: Callable[[Any], Any]  # file -> the decoded item (a PIL picture, a waveform), or ItemError
    columns: tuple[str, ...]  # the columns `probe` fills in the item table
    # ([(title, [SheetItem])], path, roots): results for people to look at, the items read through `roots`
    results_sheet: Callable[..., None] | None = None
    # (open file, size) -> an (H, W, 3) uint8 picture of the item at most size pixels a side, for
    # embedding maps and failure galleries (a sound may draw its spectrogram); or ItemError
    thumbnail: Callable[[Any, int], Any] | None = None
    sheet_name: str = "contact sheet"  # what `results_sheet` writes, in messages ("listening page" for sounds)
    map_at: tuple[int, ...] = ()  # mAP@k cut-offs its benchmarks report besides full mAP (audio: DCASE's 10)
    # (an item held in memory, the loader's `decode`) -> the item as `decode` gives it, or ItemError: what
    # the Python API takes besides files (a PIL picture or pixel array; a (waveform, sample rate) pair)
    accept: Callable[[Any, Any], Any] | None = None
    given_as: str = ""  # what `accept` takes, for messages ("a PIL image or a uint8 array")

    def is_item_file(self, name: str) -> bool:
        return name.lower().endswith(self.extensions) and not name.startswith(".")

    @property
    def table(self) -> str:
        """The item table's file in a prepared dataset: `images.parquet`, `audio.parquet`."""
        return f"{self.plural}.parquet"

    @property
    def id_column(self) -> str:
        """The item key's column on disk: `image_id`, `audio_id` (`item_id` once loaded, whatever the modality)."""
        return f"{self.name}_id"


MODALITIES: Registry = Registry("modality")  # name -> Modality


def register_modality(modality: Modality) -> Modality:
    """Add a kind of item; a taken name raises."""
    return MODALITIES.add(modality.name, modality, modality.decode.__module__)


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
    """address -> model input: open the item (a file, or a member of a tar shard) through `roots`,
    decode it, then transform it. Picklable when its parts are, so DataLoader workers can run it.
    A loader reads only where it is told (`reading`): a dataset's roots, or anywhere for the files
    a user names as queries; one never told refuses every file."""

    decode: Callable[[Any], Any]
    transform: Callable[[Any], Any]
    roots: Roots = Roots()

    def reading(self, roots: Roots) -> "ItemLoader":
        return replace(self, roots=roots)

    def __call__(self, path: str | Path) -> Any:
        with open_source(path, self.roots) as source:
            return self.transform(self.decode(source))


def open_source(path: str | Path, roots: Roots) -> Any:
    """The item at `path` opened through `roots`, as a modality's decoder takes it (an open binary
    file); a file that is missing, may not be read or cannot be is an ItemError saying why."""
    try:
        return open_item(path, roots)
    except FileNotFoundError:
        raise ItemError("file not found") from None
    except UnsafePath as e:
        raise ItemError(e.reason) from None
    except MemberError as e:
        raise ItemError(str(e)) from None
    except OSError as e:
        raise ItemError(f"cannot open: {e.strerror or e}") from None
