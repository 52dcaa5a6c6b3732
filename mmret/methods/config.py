"""The config of each built-in method: the settings every method shares (`MethodConfig`) plus its
own, validated on creation. Plain dataclasses, importable without
torch, so a command line's options are checked before any model code loads; each method's module
(`heads`, `bridge`, `towers`, `scratch`) uses its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from mmret.errors import MmretError


def check_positive(name: str, value: float | int | None) -> None:
    if value is not None and value <= 0:
        raise MmretError(f"--{name} must be positive, got {value}")


@dataclass
class MethodConfig:
    """The settings every method has; a method's own config class adds its own."""

    method: str = "bridge"  # the method's registered name
    embed_dim: int = 512  # size of the shared embedding space
    dropout: float = 0.1  # dropout in heads, bridge and scratch towers
    temperature: str = "learned"  # learned | fixed | dynamic
    init_temperature: float = 0.07  # initial softmax temperature (logit scale 1/T)

    def __post_init__(self) -> None:
        check_positive("embed-dim", self.embed_dim)
        if not 0 <= self.dropout < 1:
            raise MmretError("--dropout and --lora-dropout must be in [0, 1)")
        if self.temperature not in ("learned", "fixed", "dynamic"):
            raise MmretError(f"--temperature must be learned, fixed or dynamic, got {self.temperature!r}")


@dataclass
class HeadsConfig(MethodConfig):
    method: str = "heads"
    head_layers: int = 2  # projection heads: 1 = linear, 2+ = MLP
    head_hidden: int | None = None  # hidden width of MLP heads (default: the input width)
    input_norm: bool = True  # standardise cached features at the tower inputs (initialised from train data)
    mixup: float = 0.0  # latent mixup Beta(alpha, alpha) on cached features (0: off)
    views: int = 0  # augmented views (random crops/flips) of each picture cached once; training draws one per epoch

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive("head-layers", self.head_layers)
        if self.mixup < 0:
            raise MmretError(f"--mixup must be 0 (off) or a positive Beta alpha, got {self.mixup}")
        if self.views < 0:
            raise MmretError(f"--views must be 0 (off) or a number of augmented views, got {self.views}")


@dataclass
class BridgeConfig(HeadsConfig):
    method: str = "bridge"
    queries: int = 32  # learnable query vectors (0: the pooled path alone)
    bridge_layers: int = 2  # cross-attention blocks
    bridge_width: int = 384  # width of queries and blocks
    bridge_heads: int = 6  # attention heads
    token_pool: int = 1  # average-pool the patch grid by this factor first (2: about 4x fewer tokens)
    bridge_base: str = "cls"  # the pooled path the queries correct: cls | mean token | cls+mean (patches' mean too), or none
    token_drop: float = 0.0  # share of the patch tokens hidden from the queries per picture in training
    query_drop: float = 0.0  # share of the queries left out of the average in training

    # what a config.json written before these settings existed meant
    SAVED_BEFORE: ClassVar[dict] = {"bridge_base": "none"}

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("bridge_layers", "bridge_width", "bridge_heads", "token_pool"):
            check_positive(name.replace("_", "-"), getattr(self, name))
        if self.queries < 0 or (self.queries == 0 and self.bridge_base == "none"):
            raise MmretError(f"--queries must be positive (or 0 with a --bridge-base path), got {self.queries}")
        if self.bridge_width % self.bridge_heads:
            raise MmretError(f"--bridge-width {self.bridge_width} must be divisible by --bridge-heads {self.bridge_heads}")
        if self.bridge_base not in BRIDGE_BASES:
            raise MmretError(f"--bridge-base must be one of {', '.join(BRIDGE_BASES)}, got {self.bridge_base!r}")
        for name in ("token_drop", "query_drop"):
            if not 0 <= getattr(self, name) < 1:
                raise MmretError(f"--{name.replace('_', '-')} must be in [0, 1), got {getattr(self, name)}")


BRIDGE_BASES = ("cls", "mean", "cls+mean", "none")


@dataclass
class TowerConfig(MethodConfig):
    """What every tower-adapting method has: a head over each expert and the tower(s) it adapts."""

    head_layers: int = 2  # projection heads over the experts: 1 = linear, 2+ = MLP
    head_hidden: int | None = None  # hidden width of MLP heads (default: the input width)
    tower: str = "both"  # which tower is adapted: text | vision | both

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive("head-layers", self.head_layers)
        if self.tower not in ("text", "vision", "both"):
            raise MmretError(f"--tower must be text, vision or both, got {self.tower!r}")


@dataclass
class LoraConfig(TowerConfig):
    method: str = "lora"
    rank: int = 8  # LoRA rank r
    alpha: float | None = None  # LoRA scaling alpha (default 2 x rank)
    lora_dropout: float = 0.1  # dropout on the low-rank path
    targets: str = "q,v"  # attention projections to adapt (q, k, v, o, mlp)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive("rank", self.rank)
        if not 0 <= self.lora_dropout < 1:
            raise MmretError("--dropout and --lora-dropout must be in [0, 1)")
        if self.alpha is None:
            self.alpha = 2.0 * self.rank


@dataclass
class PrefixConfig(TowerConfig):
    method: str = "prefix"
    prefix_tokens: int = 16  # virtual tokens per tower

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive("prefix-tokens", self.prefix_tokens)


@dataclass
class AdapterConfig(TowerConfig):
    method: str = "adapter"
    adapter_dim: int = 64  # bottleneck width

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive("adapter-dim", self.adapter_dim)


@dataclass
class FullConfig(TowerConfig):
    method: str = "full"


@dataclass
class ScratchConfig(MethodConfig):
    method: str = "scratch"
    arch: str = "miniclip"  # miniclip | clip-tiny | clip-b16
    image_model: str = "resnet34"  # miniclip: timm CNN of the image tower
    image_size: int = 64  # picture side in pixels
    text_width: int = 256  # miniclip: Linformer width
    text_depth: int = 4  # miniclip: Linformer blocks
    linformer_k: int = 16  # Linformer projected sequence length
    tokenizer: str = "bpe"  # bpe (trained on the captions) or a transformers tokenizer
    vocab_size: int = 2000  # BPE vocabulary size
    pretrained_image: bool = False  # start the ResNet from ImageNet weights

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("linformer_k", "vocab_size", "image_size", "text_width", "text_depth"):
            check_positive(name.replace("_", "-"), getattr(self, name))



# the config of each built-in method by name (`mmret.methods.catalog` names the rest of it)
BUILTIN_CONFIGS: dict[str, type[MethodConfig]] = {
    "heads": HeadsConfig, "bridge": BridgeConfig, "lora": LoraConfig, "prefix": PrefixConfig,
    "adapter": AdapterConfig, "full": FullConfig, "scratch": ScratchConfig, "zeroshot": MethodConfig,
}
