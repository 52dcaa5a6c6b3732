"""One reader per source format, registered by name for `mmret prepare SOURCE`.

`base` is what a reader produces and the helpers readers share, `registry` the one table of
readers. The built-in readers are named here, above the modules that define them, with the help
`mmret prepare --help` lists (readable without importing any reader or pandas); a reader's module
is imported when the reader is first asked for (`get_reader`).
"""

import importlib

from mmret.data.readers.base import SPLITS
from mmret.data.readers.registry import PATTERN_ROOTS, READERS, register_reader
from mmret.errors import MmretError

# name -> (the module that registers it, its help), in the order `--help` lists them
BUILTIN_READERS = {
    "flickr30k": ("mmret.data.readers.flickr30k",
                  "Flickr30k: dataset_flickr30k.json, flickr30k_*_karpathy.txt or Kaggle results.csv"),
    "coco": ("mmret.data.readers.coco", "MS-COCO: captions_{train,val}2014.json and/or Karpathy's dataset_coco.json"),
    "flickr8k": ("mmret.data.readers.flickr8k",
                 "Flickr8k: Flickr8k.token.txt with Flickr_8k.{train,dev,test}Images.txt"),
    "folder": ("mmret.data.readers.folder",
               "any folder of images or sounds with x.txt captions beside them, or a captions.csv/.jsonl/.parquet; "
               "with --no-captions, any folder of images or sounds"),
    "classes": ("mmret.data.readers.classes",
                "items sorted into class folders (root/<class>/...), or a labels.csv/.jsonl/.parquet of image and "
                "label; for eval --task classification and linear-probe"),
    "example": ("mmret.data.readers.example",
                "a built-in set of coloured-shape pictures with captions, generated with no download"),
    "wds": ("mmret.data.readers.wds_benchmark",
            "webdataset .tar shards as img2dataset writes them (key.jpg + key.txt, optional key.json), --root "
            "'shards/{00000..00099}.tar'; or a CLIP_benchmark webdataset folder (--root DIR holding test/nshards.txt, "
            "test/0.tar, ...; retrieval or classification)"),
    "sugar-crepe": ("mmret.data.readers.sugar_crepe",
                    "SugarCrepe's caption-selection examples: <category>.json (filename, caption, negative_caption) over a "
                    "picture folder (COCO val2017), --root the pictures, the JSON files there or in its parent"),
    "winoground": ("mmret.data.readers.winoground",
                   "Winoground's caption-selection examples: examples.jsonl with images/ (2 pictures x 2 captions)"),
    "clotho": ("mmret.data.readers.clotho",
               "Clotho: clotho_captions_{development,validation,evaluation}.csv with the audio folders"),
    "audiocaps": ("mmret.data.readers.audiocaps",
                  "AudioCaps: train/val/test.csv with the clips you have, found by YouTube id"),
}


def reader_help() -> dict[str, str]:
    """Every reader's help by name: the built-in ones (none imported), then any registered since."""
    from mmret.data.readers.registry import HELP

    builtin = {name: help for name, (_, help) in BUILTIN_READERS.items()}
    return {**builtin, **{name: HELP.get(name, "") for name in READERS if name not in builtin}}


def get_reader(name: str):
    """The reader of source format `name` (a built-in reader's module is imported on first use)."""
    if name not in READERS and name in BUILTIN_READERS:
        importlib.import_module(BUILTIN_READERS[name][0])
    if name not in READERS:
        raise MmretError(f"unknown source {name!r}; choose one of {', '.join(reader_help())}")
    return READERS[name]


def pattern_root(name: str) -> bool:
    """Whether the reader's --root is a pattern of files (shards), not a folder."""
    if name in BUILTIN_READERS:
        get_reader(name)
    return name in PATTERN_ROOTS


__all__ = ["BUILTIN_READERS", "READERS", "SPLITS", "get_reader", "pattern_root", "reader_help", "register_reader"]
