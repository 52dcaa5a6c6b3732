"""`bridge`: the querying bridge, a small BLIP-2 Q-Former over a frozen image tower's tokens.

K learnable queries attend over the cached image token states through L blocks and are pooled
into the shared space; the text side is a projection head over the pooled caption feature.
Only the bridge, the text head, their input norms and the temperature train.
"""

from __future__ import annotations

from mmret.methods import FeatureDims, register_method
from mmret.methods.heads import with_input_norm
from mmret.models import DualEncoder, ProjectionHead, QueryBridge
from mmret.models.temperature import build_temperature


@register_method("bridge", help="a querying bridge (small Q-Former) over cached image tokens, a head over text",
                 inputs="features", lr=5e-4, image_tokens=True)
def build(cfg, dims: FeatureDims) -> DualEncoder:
    m = cfg.method
    bridge = QueryBridge(dims.image_token_dim, m.embed_dim, num_queries=m.queries, depth=m.bridge_layers,
                         width=m.bridge_width, heads=m.bridge_heads, dropout=m.dropout, token_pool=m.token_pool)
    text = ProjectionHead(dims.text_dim, m.embed_dim, m.head_layers, m.head_hidden, m.dropout)
    return DualEncoder(with_input_norm(dims.image_token_dim, bridge, m.input_norm),
                       with_input_norm(dims.text_dim, text, m.input_norm),
                       m.embed_dim, build_temperature(m.temperature, m.init_temperature))
