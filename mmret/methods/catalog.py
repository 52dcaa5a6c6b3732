"""The methods by name: the built-in ones (the module that registers each, its config class and
its one-line help, all readable without importing torch, so `mmret train --help` lists them and
their options from here), and the lookups, which import a built-in method's module the first time
it is asked for.

This module stands above the method modules it names; they import only the registry below them
(`mmret.methods.registry`), so nothing imports this module back.
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from typing import Any

from mmret.errors import MmretError
from mmret.methods.base import Method
from mmret.methods.config import (
    AdapterConfig,
    BridgeConfig,
    FullConfig,
    HeadsConfig,
    LoraConfig,
    MethodConfig,
    PrefixConfig,
    ScratchConfig,
    ZeroShotConfig,
)
from mmret.methods.registry import METHODS


@dataclass(frozen=True)
class Builtin:
    module: str  # the module that registers it
    config: type[MethodConfig]
    help: str  # one line for `--method`'s help
    trainable: bool = True  # False: a pretrained model evaluated as it is


# in the order `--help` lists them
BUILTIN_METHODS: dict[str, Builtin] = {
    "heads": Builtin("mmret.methods.heads", HeadsConfig,
                     "projection heads over cached pooled features of both frozen towers"),
    "bridge": Builtin("mmret.methods.bridge", BridgeConfig,
                      "a querying bridge (small Q-Former) over cached item tokens correcting a head over the class "
                      "token, a head over text"),
    "lora": Builtin("mmret.methods.towers", LoraConfig, "LoRA (peft) inside one or both towers, with heads over them"),
    "prefix": Builtin("mmret.methods.towers", PrefixConfig,
                      "learned prompt tokens in every block of the towers (deep prompt tuning)"),
    "adapter": Builtin("mmret.methods.towers", AdapterConfig,
                       "bottleneck adapters after attention and MLP in every block"),
    "full": Builtin("mmret.methods.towers", FullConfig, "full fine-tuning of both towers (the reference row)"),
    "scratch": Builtin("mmret.methods.scratch", ScratchConfig,
                       "a small CLIP trained from scratch (MiniCLIP: ResNet + Linformer, or a random CLIP)"),
    "zeroshot": Builtin("mmret.methods.zeroshot", ZeroShotConfig,
                        "a pretrained CLIP or CLAP as it is (made by eval --zero-shot)", trainable=False),
}


def get_method(name: str, training: bool = False) -> Method:
    """The method called `name`, its module imported if it is a built-in not imported yet. An unknown
    name (or, `training`, one that cannot train) is answered without importing torch."""
    if name not in METHODS and name in BUILTIN_METHODS and (BUILTIN_METHODS[name].trainable or not training):
        importlib.import_module(BUILTIN_METHODS[name].module)
    if name not in METHODS or (training and not METHODS[name].trainable):
        raise MmretError(f"unknown method {name!r}; choose one of {', '.join(method_names())}")
    return METHODS[name]


def registry() -> dict[str, Method]:
    """Every method, the built-in ones imported first and listed in `--help`'s order, then the others."""
    for name in BUILTIN_METHODS:
        get_method(name)
    return {**{name: METHODS[name] for name in BUILTIN_METHODS}, **METHODS}


def method_names(trainable: bool = True) -> list[str]:
    """The methods' names (only those that train, by default), built-in first, none imported."""
    names = [n for n, b in BUILTIN_METHODS.items() if b.trainable or not trainable]
    return names + [n for n, m in METHODS.items() if n not in names and (m.trainable or not trainable)]


def method_help() -> str:
    """Every trainable method and what it does, for `--method`'s help."""
    def about(name: str) -> str:
        return BUILTIN_METHODS[name].help if name in BUILTIN_METHODS else METHODS[name].help

    return "; ".join(f"{name}: {about(name)}" for name in method_names())


def method_configs() -> dict[str, type[MethodConfig]]:
    """Every method's config class by name, the built-in ones without importing their modules."""
    builtin = {name: b.config for name, b in BUILTIN_METHODS.items()}
    return {**builtin, **{name: m.config for name, m in METHODS.items() if name not in builtin}}


def config_class(name: str) -> type[MethodConfig]:
    """The config class of method `name`, without importing the method's code."""
    configs = method_configs()
    if name not in configs:
        get_method(name)  # the one-line error for an unknown method
    return configs[name]


def _fields(kind: type) -> set[str]:
    return {f.name for f in dataclasses.fields(kind)}


def method_settings() -> set[str]:
    """Every setting of every method's config (the built-in ones and any registered since)."""
    return set().union(*(_fields(c) for c in method_configs().values()))


def owners(setting: str) -> list[str]:
    """The methods whose config has `setting`."""
    return [name for name, kind in method_configs().items() if setting in _fields(kind)]


def config_for(name: str, **values: Any) -> MethodConfig:
    """The config of method `name` from `values`; settings that belong to other methods are left
    out (a config.json written before methods had configs of their own holds them all)."""
    kind = config_class(name)
    unknown = set(values) - method_settings()
    if unknown:
        raise MmretError(f"unknown method settings in config: {', '.join(sorted(unknown))}")
    own = _fields(kind) - {"method"}
    return kind(**{k: v for k, v in values.items() if k in own}, method=name)
