"""The config of each built-in method: the settings every method shares (`MethodConfig`) plus its
own, each declared once with its default and help (`option`: the command line's options and a
config file's keys are generated from them) and validated on creation with messages that name
the option. Plain dataclasses, importable without torch, so a command line is checked before any
model code loads; each method's module (`heads`, `bridge`, `towers`, `scratch`, `zeroshot`) uses
its own. The LoRA recipes are named sets of `LoraConfig` settings.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from mmret.common.options import option
from mmret.errors import MmretError


def check_positive(name: str, value: float | int | None) -> None:
    if value is not None and value <= 0:
        raise MmretError(f"--{name} must be positive, got {value}")


def check_fraction(name: str, value: float) -> None:
    if not 0 <= value < 1:
        raise MmretError(f"--{name} must be in [0, 1), got {value}")


@dataclass
class MethodConfig:
    """The settings every method has; a method's own config class adds its own."""

    # the library's default; `mmret train` without a method asks `mmret.methods.choice`
    method: str = option("heads", "Training method", shown="chosen for the settings and captions given, said at "
                                                           "start (heads; bridge for captions that name relations)")
    embed_dim: int = option(512, "Size of the shared embedding space")
    dropout: float = option(0.1, "Dropout in heads, bridge and scratch towers")
    temperature: str = option("learned", "Softmax temperature: learned, fixed or dynamic")
    init_temperature: float = option(0.07, "Starting softmax temperature (the logit scale is its inverse)")

    def __post_init__(self) -> None:
        check_positive("embed-dim", self.embed_dim)
        check_fraction("dropout", self.dropout)
        if self.temperature not in ("learned", "fixed", "dynamic"):
            raise MmretError(f"--temperature must be learned, fixed or dynamic, got {self.temperature!r}")
        check_positive("init-temperature", self.init_temperature)


@dataclass
class ProjectionConfig(MethodConfig):
    """A projection head on each side, over a frozen tower's features or an adapted tower."""

    head_layers: int = option(2, "Projection heads: 1 linear, 2 or more an MLP")
    head_hidden: int | None = option(None, "Hidden width of MLP heads", shown="the input width")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive("head-layers", self.head_layers)
        check_positive("head-hidden", self.head_hidden)


@dataclass
class HeadsConfig(ProjectionConfig):
    method: str = "heads"
    input_norm: bool = option(True, "Standardise the cached features at the heads' inputs (started from training "
                                    "data)")
    mixup: float = option(0.0, "Latent mixup Beta(alpha, alpha) on cached features, as in FuseMix; 0 is off")
    views: int = option(0, "Augmented views (random crops, flips) of each picture cached once; each epoch reads one")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mixup < 0:
            raise MmretError(f"--mixup must be 0 (off) or a positive Beta alpha, got {self.mixup}")
        if self.views < 0:
            raise MmretError(f"--views must be 0 (off) or a number of augmented views, got {self.views}")


BRIDGE_BASES = ("cls", "mean", "cls+mean", "none")


@dataclass
class BridgeConfig(HeadsConfig):
    method: str = "bridge"
    queries: int = option(32, "Learnable queries K; 0 for the pooled path alone (with --bridge-base)")
    bridge_layers: int = option(2, "Cross-attention blocks L")
    bridge_width: int = option(384, "Width of the queries and blocks")
    bridge_heads: int = option(6, "Attention heads")
    token_pool: int = option(1, "Average-pool the patch grid by this factor first; 2 reads about 4x fewer tokens")
    bridge_base: str = option("cls", "The pooled path the queries correct: cls or mean token, cls+mean (the class "
                                     "token plus the patches' mean), or none for the queries alone")
    token_drop: float = option(0.0, "Share of patch tokens hidden per picture in training")
    query_drop: float = option(0.0, "Share of queries left out of the average in training")
    bridge_positions: bool = option(False, "Add learned 2-D position embeddings (a row's plus a column's) to the "
                                           "patch tokens the queries read")

    # what a config.json written before these settings existed meant
    SAVED_BEFORE: ClassVar[dict] = {"bridge_base": "none"}

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("bridge_layers", "bridge_width", "bridge_heads", "token_pool"):
            check_positive(name.replace("_", "-"), getattr(self, name))
        if self.queries < 0 or (self.queries == 0 and self.bridge_base == "none"):
            raise MmretError(f"--queries must be positive (or 0 with a --bridge-base path), got {self.queries}")
        if self.bridge_width % self.bridge_heads:
            raise MmretError(f"--bridge-width {self.bridge_width} must be divisible by --bridge-heads "
                             f"{self.bridge_heads}")
        if self.bridge_base not in BRIDGE_BASES:
            raise MmretError(f"--bridge-base must be one of {', '.join(BRIDGE_BASES)}, got {self.bridge_base!r}")
        check_fraction("token-drop", self.token_drop)
        check_fraction("query-drop", self.query_drop)


@dataclass
class TowerConfig(ProjectionConfig):
    """What every tower-adapting method has: a head over each tower and the tower(s) it adapts."""

    tower: str = option("both", "Which tower to adapt: text, vision (the item tower) or both")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.tower not in ("text", "vision", "both"):
            raise MmretError(f"--tower must be text, vision or both, got {self.tower!r}")


@dataclass
class LoraConfig(TowerConfig):
    method: str = "lora"
    rank: int = option(8, "LoRA rank r")
    # alpha follows the rank (2 x rank) unless given: a new --rank alone works it out again
    alpha: float | None = option(None, "LoRA scaling alpha", shown="2 x rank", follows="rank")
    lora_dropout: float = option(0.1, "Dropout on the LoRA path")
    targets: str = option("q,v", "Attention projections LoRA adapts, comma-separated among q, k, v, o, mlp")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive("rank", self.rank)
        check_positive("alpha", self.alpha)
        check_fraction("lora-dropout", self.lora_dropout)
        if self.alpha is None:
            self.alpha = 2.0 * self.rank


@dataclass
class PrefixConfig(TowerConfig):
    method: str = "prefix"
    prefix_tokens: int = option(16, "Learned prompt tokens per block")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive("prefix-tokens", self.prefix_tokens)


@dataclass
class AdapterConfig(TowerConfig):
    method: str = "adapter"
    adapter_dim: int = option(64, "Bottleneck width of the adapters")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive("adapter-dim", self.adapter_dim)


@dataclass
class FullConfig(TowerConfig):
    method: str = "full"


@dataclass
class ScratchConfig(MethodConfig):
    method: str = "scratch"
    arch: str = option("miniclip", "What is trained: miniclip (ResNet + Linformer), clip-tiny or clip-b16")
    image_model: str = option("resnet34", "miniclip: the timm CNN of the image tower")
    image_size: int = option(64, "Picture side in pixels")
    text_width: int = option(256, "miniclip: Linformer width")
    text_depth: int = option(4, "miniclip: Linformer blocks")
    linformer_k: int = option(16, "miniclip: keys and values projected to this length")
    tokenizer: str = option("bpe", "bpe (trained on the captions, saved in the run) or a transformers tokenizer "
                                   "id or folder")
    vocab_size: int = option(2000, "BPE vocabulary size")
    pretrained_image: bool = option(False, "miniclip: start the ResNet from ImageNet weights (needs the hub or its "
                                           "cache)", flags=("--pretrained-image/--random-image",))

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("linformer_k", "vocab_size", "image_size", "text_width", "text_depth"):
            check_positive(name.replace("_", "-"), getattr(self, name))


@dataclass
class ZeroShotConfig(MethodConfig):
    method: str = "zeroshot"


# Named LoRA recipes a user picks with one flag (`--recipe text-r8`): LoraConfig settings; alpha is
# left to follow the rank, so a --rank given beside a recipe takes its alpha with it
RECIPES: dict[str, dict[str, Any]] = {
    "text-r8": dict(method="lora", tower="text", rank=8, targets="q,v", lora_dropout=0.1),
    "both-r64": dict(method="lora", tower="both", rank=64, targets="q,k,v", lora_dropout=0.1),
}


def recipe_help() -> str:
    return "; ".join(f"{name}: " + ", ".join(f"{k} {v}" for k, v in values.items()) for name, values in RECIPES.items())


def recipe_values(name: str, given: dict[str, Any] | None = None) -> dict[str, Any]:
    """A recipe's settings with the user's own (`given`; None: not given) on top."""
    if name not in RECIPES:
        raise MmretError(f"unknown --recipe {name!r}; choose one of {', '.join(RECIPES)}")
    return {**RECIPES[name], **{k: v for k, v in (given or {}).items() if v is not None}}
