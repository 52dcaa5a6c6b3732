"""The built-in methods by name: the module that defines each, its one-line help, and the LoRA
recipes' help, readable without importing torch (`mmret train --help` lists them from here; the
modules are imported when a method is first asked for, see `mmret.methods.base.get_method`)."""

from __future__ import annotations

from typing import Any

from mmret.errors import MmretError

# name -> (module that registers it, help, trainable)
BUILTIN_METHODS: dict[str, tuple[str, str, bool]] = {
    "heads": ("mmret.methods.heads", "projection heads over cached pooled features of both frozen towers", True),
    "bridge": ("mmret.methods.bridge",
               "a querying bridge (small Q-Former) over cached item tokens correcting a head over the class token, "
               "a head over text", True),
    "lora": ("mmret.methods.towers", "LoRA (peft) inside one or both towers, with heads over experts", True),
    "prefix": ("mmret.methods.towers", "learned prompt tokens in every block of the towers (deep prompt tuning)", True),
    "adapter": ("mmret.methods.towers", "bottleneck adapters after attention and MLP in every block", True),
    "full": ("mmret.methods.towers", "full fine-tuning of both towers (the reference row)", True),
    "scratch": ("mmret.methods.scratch",
                "a small CLIP trained from scratch (MiniCLIP: ResNet + Linformer, or a random CLIP)", True),
    "zeroshot": ("mmret.methods.zeroshot", "a pretrained CLIP or CLAP as it is (made by eval --zero-shot)", False),
}

# Named LoRA recipes a user picks with one flag; keys are LoraConfig fields.
RECIPES: dict[str, dict[str, Any]] = {
    "text-r8": dict(method="lora", tower="text", rank=8, alpha=16.0, targets="q,v", lora_dropout=0.1),
    "both-r64": dict(method="lora", tower="both", rank=64, alpha=128.0, targets="q,k,v", lora_dropout=0.1),
}
RECIPE_HELP = {
    "text-r8": "LoRA r=8, alpha=16 on q and v of the text tower only, dropout 0.1",
    "both-r64": "LoRA r=64, alpha=128 on q, k and v of both towers, dropout 0.1",
}


def help_of(name: str) -> str:
    return BUILTIN_METHODS[name][1]


def method_help() -> str:
    """`--method`'s help: every trainable built-in method and what it trains."""
    return "; ".join(f"{name}: {help}" for name, (_, help, trainable) in BUILTIN_METHODS.items() if trainable)


def recipe_values(name: str, given: dict[str, Any] | None = None) -> dict[str, Any]:
    """A recipe's settings with the user's own flags (`given`, None: not given) on top.

    A rank given without an alpha drops the recipe's alpha, so alpha follows the rank (2 x rank).
    """
    if name not in RECIPES:
        raise MmretError(f"unknown --recipe {name!r}; choose one of {', '.join(RECIPES)}")
    given = {k: v for k, v in (given or {}).items() if v is not None}
    values = {**RECIPES[name], **given}
    if "rank" in given and "alpha" not in given:
        values["alpha"] = None
    return values
