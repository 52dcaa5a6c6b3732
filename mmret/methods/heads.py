"""`heads`: projection heads on the pooled features of two frozen towers (locked-image tuning).

The baseline every comparison needs: only the two heads (each after an `InputNorm` that
standardises the cached features) and the temperature train, over cached pooled features, so an
epoch costs a few matrix products.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from torch import nn

from mmret.errors import MmretError
from mmret.methods.catalog import help_of
from mmret.methods.base import MethodConfig, check_positive, register_method
from mmret.methods.features import FeatureContext, FeaturesMethod
from mmret.models import DualEncoder, ProjectionHead
from mmret.models.heads import InputNorm
from mmret.models.mixup import latent_mixup
from mmret.models.temperature import build_temperature


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


def with_input_norm(dim: int, tower: nn.Module, enabled: bool) -> nn.Module:
    return nn.Sequential(InputNorm(dim), tower) if enabled else tower


class HeadsMethod(FeaturesMethod):
    name = "heads"
    help = help_of("heads")
    lr = 1e-3
    config = HeadsConfig

    def batch_transform(self, cfg: Any) -> Callable | None:
        """Latent mixup of the cached features (`--mixup`, FuseMix), or None."""
        alpha = cfg.method.mixup
        return (lambda images, texts, gen: latent_mixup(images, texts, alpha, gen)[:2]) if alpha > 0 else None

    def build(self, cfg, ctx: FeatureContext) -> DualEncoder:
        m, dims = cfg.method, ctx.dims
        heads = [with_input_norm(d, ProjectionHead(d, m.embed_dim, m.head_layers, m.head_hidden, m.dropout),
                                 m.input_norm) for d in (dims.image_dim, dims.text_dim)]
        return DualEncoder(*heads, m.embed_dim, build_temperature(m.temperature, m.init_temperature))


register_method(HeadsMethod())
