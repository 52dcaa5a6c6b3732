"""`heads`: projection heads on the pooled features of two frozen towers (locked-image tuning).

The baseline every comparison needs: only the two heads (each after an `InputNorm` that
standardises the cached features) and the temperature train, over cached pooled features, so an
epoch costs a few matrix products.
"""

from __future__ import annotations

from torch import nn

from mmret.methods import FeatureDims, register_method
from mmret.models import DualEncoder, ProjectionHead
from mmret.models.heads import InputNorm
from mmret.models.temperature import build_temperature


def with_input_norm(dim: int, tower: nn.Module, enabled: bool) -> nn.Module:
    return nn.Sequential(InputNorm(dim), tower) if enabled else tower


@register_method("heads", help="projection heads over cached pooled features of both frozen towers",
                 inputs="features", lr=1e-3)
def build(cfg, dims: FeatureDims) -> DualEncoder:
    m = cfg.method
    heads = [with_input_norm(d, ProjectionHead(d, m.embed_dim, m.head_layers, m.head_hidden, m.dropout), m.input_norm)
             for d in (dims.image_dim, dims.text_dim)]
    return DualEncoder(*heads, m.embed_dim, build_temperature(m.temperature, m.init_temperature))
