"""The config of each built-in method: the settings every method shares (`MethodConfig`) plus its
own, validated on creation. Plain dataclasses, importable without
torch, so a command line's options are checked before any model code loads; each method's module
(`heads`, `bridge`, `towers`, `scratch`) uses its own.
"""

from __future__ import annotations

from dataclasses import dataclass

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

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive("head-layers", self.head_layers)
        if self.mixup < 0:
            raise MmretError(f"--mixup must be 0 (off) or a positive Beta alpha, got {self.mixup}")


@dataclass
class BridgeConfig(HeadsConfig):
    method: str = "bridge"
    queries: int = 32  # learnable query vectors
    bridge_layers: int = 2  # cross-attention blocks
    bridge_width: int = 384  # width of queries and blocks
    bridge_heads: int = 6  # attention heads
    token_pool: int = 1  # average-pool the patch grid by this factor first (2: about 4x fewer tokens)

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("queries", "bridge_layers", "bridge_width", "bridge_heads", "token_pool"):
            check_positive(name.replace("_", "-"), getattr(self, name))
        if self.bridge_width % self.bridge_heads:
            raise MmretError(f"--bridge-width {self.bridge_width} must be divisible by --bridge-heads {self.bridge_heads}")


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
