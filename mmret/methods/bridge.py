"""`bridge`: the querying bridge, a small BLIP-2 Q-Former over a frozen item tower's tokens.

K learnable queries attend over the cached token states through L blocks and are pooled into
the shared space; the text side is a projection head over the pooled caption feature. Only the
bridge, the text head, their input norms and the temperature train.
"""

from __future__ import annotations


from mmret.methods.catalog import help_of
from mmret.methods.config import BridgeConfig
from mmret.methods.base import register_method
from mmret.methods.features import FeatureContext
from mmret.methods.heads import HeadsMethod, with_input_norm
from mmret.models import DualEncoder, ProjectionHead, QueryBridge
from mmret.models.temperature import build_temperature


class BridgeMethod(HeadsMethod):
    name = "bridge"
    help = help_of("bridge")
    lr = 5e-4
    config = BridgeConfig
    image_tokens = True

    def build(self, cfg, ctx: FeatureContext) -> DualEncoder:
        m, dims = cfg.method, ctx.dims
        bridge = QueryBridge(dims.image_token_dim, m.embed_dim, num_queries=m.queries, depth=m.bridge_layers,
                             width=m.bridge_width, heads=m.bridge_heads, dropout=m.dropout, token_pool=m.token_pool)
        text = ProjectionHead(dims.text_dim, m.embed_dim, m.head_layers, m.head_hidden, m.dropout)
        return DualEncoder(with_input_norm(dims.image_token_dim, bridge, m.input_norm),
                           with_input_norm(dims.text_dim, text, m.input_norm),
                           m.embed_dim, build_temperature(m.temperature, m.init_temperature))


register_method(BridgeMethod())
