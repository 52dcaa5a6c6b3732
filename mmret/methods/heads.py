"""`heads`: projection heads on the pooled features of two frozen towers (locked-image tuning).

The baseline every comparison needs: only the two heads (each after an `InputNorm` that
standardises the cached features) and the temperature train, over cached pooled features, so an
epoch costs a few matrix products.
"""

from __future__ import annotations

from typing import Any, Callable

from torch import nn

from mmret.features import ensure_features
from mmret.features.precompute import item_views
from mmret.methods.config import HeadsConfig
from mmret.methods.features import FeatureContext, FeaturesMethod
from mmret.methods.registry import register_method
from mmret.models import DualEncoder, ProjectionHead
from mmret.models.heads import InputNorm
from mmret.models.mixup import latent_mixup
from mmret.models.temperature import build_temperature


def with_input_norm(dim: int, tower: nn.Module, enabled: bool) -> nn.Module:
    return nn.Sequential(InputNorm(dim), tower) if enabled else tower


class HeadsMethod(FeaturesMethod):
    name = "heads"
    lr = 1e-3
    config = HeadsConfig

    def sources(self, cfg: Any, ctx: FeatureContext, dataset: Any, splits: tuple[str, ...], device: Any,
                reporter: Any) -> list[Any]:
        """The feature sources; with `--views K` the training one also reads K augmented views."""
        sources = super().sources(cfg, ctx, dataset, splits, device, reporter)
        if cfg.method.views and "train" in splits:
            views = [ensure_features(dataset, ctx.item, dataset.modality.plural, tokens=self.item_tokens,
                                     reporter=reporter, device=device, view=view)
                     for view in item_views(dataset, cfg.method.views, cfg.train.hflip)]
            sources[splits.index("train")].use_views(views, cfg.train.seed)
        return sources

    def batch_transform(self, cfg: Any) -> Callable | None:
        """Latent mixup of the cached features (`--mixup`, FuseMix), or None."""
        alpha = cfg.method.mixup
        return (lambda items, texts, gen: latent_mixup(items, texts, alpha, gen)[:2]) if alpha > 0 else None

    def build(self, cfg, ctx: FeatureContext) -> DualEncoder:
        m, dims = cfg.method, ctx.dims
        heads = [with_input_norm(d, ProjectionHead(d, m.embed_dim, m.head_layers, m.head_hidden, m.dropout),
                                 m.input_norm) for d in (dims.item_dim, dims.text_dim)]
        return DualEncoder(*heads, m.embed_dim, build_temperature(m.temperature, m.init_temperature))


register_method(HeadsMethod())
