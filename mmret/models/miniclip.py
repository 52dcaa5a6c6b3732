"""MiniCLIP: a small CLIP trained from scratch (`--method scratch`), sized for a 2-core CPU and
64-pixel pictures.

Image tower: a timm ResNet (ResNet-34 by default, random init; ImageNet weights on request when
timm can load them). Text tower: the Linformer encoder of `mmret.models.linformer`. Each tower's
pooled output goes through its own linear map to `embed_dim`, then a residual projection MLP
(LayerNorm, 4x expansion, GELU, skip connection) that both towers share by default, so the two
modalities are mapped into the joint space by the same function. The temperature is one of the
kinds in `mmret.models.temperature`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from mmret.errors import MmretError
from mmret.models.linformer import LinformerEncoder, Mlp
from mmret.models.temperature import TEMPERATURES, build_temperature, logit_scale_for

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class MiniCLIPConfig:
    image_model: str = "resnet34"  # timm model name of the image tower
    image_pretrained: bool = False  # start the image tower from timm's ImageNet weights (hub or its cache)
    image_size: int = 64  # pictures are resized and centre-cropped to this many pixels a side
    vocab_size: int = 4096  # must match the tokenizer's vocabulary
    max_length: int = 32  # longest text in tokens (the Linformer's n)
    text_width: int = 256  # width of the Linformer
    text_depth: int = 4  # Linformer blocks
    text_heads: int = 4  # attention heads (text_width must divide by it)
    linformer_k: int = 16  # keys and values are projected along the sequence to this length
    mlp_ratio: float = 4.0  # hidden width of every MLP as a multiple of its input
    dropout: float = 0.0  # dropout in the text tower
    embed_dim: int = 256  # width of the joint embedding space
    shared_projection: bool = True  # one projection MLP for both towers (False: one each)
    temperature: str = "learned"  # learned | fixed | dynamic
    temperature_init: float = 0.07  # starting tau (logit scale 1/tau)
    temperature_max_scale: float = 100.0  # the logit scale is kept at or below this
    temperature_hidden: int = 32  # hidden width of the dynamic temperature's MLP

    def __post_init__(self) -> None:
        for name in ("image_size", "vocab_size", "max_length", "text_width", "text_depth", "text_heads",
                     "linformer_k", "embed_dim"):
            if getattr(self, name) < 1:
                raise MmretError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.image_size < 32:
            raise MmretError(f"--image-size must be at least 32 (the ResNet downsamples 32x), got {self.image_size}")
        if self.max_length < 2:
            raise MmretError(f"--max-length must be at least 2 (begin and end tokens), got {self.max_length}")
        if self.text_width % self.text_heads:
            raise MmretError(f"--text-width ({self.text_width}) must be divisible by --text-heads ({self.text_heads})")
        if self.linformer_k > self.max_length:
            raise MmretError(f"--linformer-k ({self.linformer_k}) must be at most --max-length ({self.max_length})")
        if self.mlp_ratio <= 0:
            raise MmretError(f"--mlp-ratio must be positive, got {self.mlp_ratio}")
        if not 0.0 <= self.dropout < 1.0:
            raise MmretError(f"--dropout must be in [0, 1), got {self.dropout}")
        if self.temperature not in TEMPERATURES:
            raise MmretError(f"unknown --temperature {self.temperature!r}; choose one of {', '.join(TEMPERATURES)}")

    @classmethod
    def from_dict(cls, data: dict) -> "MiniCLIPConfig":
        """Rebuild from `config.json`; unknown keys are an error, not silently dropped."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise MmretError(f"unknown MiniCLIP config keys {', '.join(unknown)}; was the run made by a newer mmret?")
        return cls(**data)


class ResidualMlp(nn.Module):
    """x + fc2(GELU(fc1(LayerNorm(x)))): the projection MLP, width kept, 4x hidden expansion."""

    def __init__(self, dim: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), dim)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.mlp(self.norm(x))  # (B, D)


def build_image_tower(name: str, pretrained: bool = False) -> nn.Module:
    """A timm model that maps pixels (B, 3, H, W) to pooled features (B, num_features)."""
    import timm

    if not timm.is_model(name):
        raise MmretError(f"unknown --image-model {name!r}; it must be a timm model name such as resnet18 or resnet34")
    try:
        return timm.create_model(name, pretrained=pretrained, num_classes=0)
    except OSError:  # huggingface_hub's "not in the cache and cannot connect" errors are OSErrors
        if not pretrained:
            raise
        raise MmretError(f"cannot load ImageNet weights for {name}: they are not in the local Hugging Face cache "
                         "and the hub cannot be reached; connect once so they are cached, "
                         "or train without --image-pretrained") from None


class MiniCLIP(nn.Module):
    """Two towers trained from scratch into one normalized embedding space, plus a temperature."""

    def __init__(self, cfg: MiniCLIPConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.visual = build_image_tower(cfg.image_model, cfg.image_pretrained)
        self.text = LinformerEncoder(cfg.vocab_size, cfg.max_length, cfg.text_width, cfg.text_depth,
                                     cfg.text_heads, cfg.linformer_k, cfg.mlp_ratio, cfg.dropout)
        self.image_in = nn.Linear(self.visual.num_features, cfg.embed_dim)
        self.text_in = nn.Linear(self.text.out_dim, cfg.embed_dim)
        # one module registered once, so a state dict (and safetensors) holds no shared tensors
        self.projection = ResidualMlp(cfg.embed_dim, cfg.mlp_ratio)
        self.text_projection = None if cfg.shared_projection else ResidualMlp(cfg.embed_dim, cfg.mlp_ratio)
        self.temperature = build_temperature(cfg.temperature, cfg.temperature_init, cfg.temperature_max_scale,
                                             cfg.temperature_hidden)

    @property
    def embed_dim(self) -> int:
        return self.cfg.embed_dim

    def encode_item(self, pixels: Tensor, normalize: bool = True) -> Tensor:
        """pixels (B, 3, S, S), ImageNet-normalized -> (B, embed_dim) (its items are pictures)."""
        x = self.projection(self.image_in(self.visual(pixels)))  # (B, E)
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor | None = None, normalize: bool = True) -> Tensor:
        """input_ids, attention_mask (B, n) -> (B, embed_dim)."""
        projection = self.projection if self.text_projection is None else self.text_projection
        x = projection(self.text_in(self.text(input_ids, attention_mask)))  # (B, E)
        return F.normalize(x, dim=-1) if normalize else x

    def logit_scale_for(self, item_emb: Tensor, text_emb: Tensor) -> Tensor:
        """The scalar logit scale for this batch of normalized embeddings: `ClipLoss`'s third argument."""
        return logit_scale_for(self.temperature, item_emb, text_emb)

    @property
    def logit_scale(self) -> Tensor | None:
        """The stored log-scale (as `DualEncoder.logit_scale`); None for a dynamic temperature."""
        return getattr(self.temperature, "log_scale", None)

    def clamp_logit_scale_(self) -> None:
        """Call after each optimizer step (as `DualEncoder`) so the learned scale stays in range."""
        self.temperature.clamp_()

    def forward(self, pixels: Tensor, input_ids: Tensor,
                attention_mask: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """(item_emb (B, E), text_emb (B, E), logit_scale ()) as open_clip's CLIP returns them."""
        item_emb = self.encode_item(pixels)
        text_emb = self.encode_text(input_ids, attention_mask)
        return item_emb, text_emb, self.logit_scale_for(item_emb, text_emb)

    def named_parts(self) -> dict[str, nn.Module]:
        """The parts for a parameter table: towers, projection (input maps and MLPs), temperature."""
        projection = nn.ModuleList([self.image_in, self.text_in, self.projection])
        if self.text_projection is not None:
            projection.append(self.text_projection)
        return {"image tower": self.visual, "text tower": self.text, "projection": projection,
                "temperature": self.temperature}


def image_transform(image_size: int = 64):
    """PIL RGB picture -> (3, S, S) float tensor: resize the short side (the long one cropped first, see
    `mmret.encoders.preprocess.ShortSideResize`), centre-crop, ImageNet-normalize."""
    from torchvision import transforms

    from mmret.encoders.preprocess import resize_and_crop

    size = (image_size, image_size)
    return transforms.Compose(resize_and_crop(image_size, size, transforms.InterpolationMode.BICUBIC) + [
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])
