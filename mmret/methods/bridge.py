"""`bridge`: a querying bridge (a small BLIP-2 Q-Former) over a frozen item tower's tokens, on
top of the heads method's projection of the pooled token.

The item side is `ResidualBridge`: a projection head over the class (or mean) token, built as the
heads method builds its item head, plus K learnable queries that attend over the cached token
states through L blocks and add a correction whose last projection starts at zero, so training
starts from the heads model (`--bridge-base none`: the queries alone, the first design).
`--bridge-positions` adds a learned row and column embedding to each patch token the queries
read, so a query can ask for a place, not only for what the states say of where they are. The text
side is a projection head over the pooled caption feature. Only the bridge, the text head, their
input norms and the temperature train.
"""

from __future__ import annotations

from mmret.methods.config import BridgeConfig
from mmret.methods.features import FeatureContext
from mmret.methods.heads import HeadsMethod, with_input_norm
from mmret.methods.registry import register_method
from mmret.models import DualEncoder, ProjectionHead, QueryBridge, ResidualBridge
from mmret.models.bridge import PooledHead
from mmret.models.temperature import build_temperature


class BridgeMethod(HeadsMethod):
    name = "bridge"
    lr = 5e-4
    config = BridgeConfig
    item_tokens = True

    def build(self, cfg, ctx: FeatureContext) -> DualEncoder:
        m, dims = cfg.method, ctx.dims
        d = dims.item_token_dim
        residual = m.bridge_base != "none"

        def head(width):
            return ProjectionHead(width, m.embed_dim, m.head_layers, m.head_hidden, m.dropout)

        def queries():
            return with_input_norm(d, QueryBridge(
                d, m.embed_dim, num_queries=m.queries, depth=m.bridge_layers, width=m.bridge_width,
                heads=m.bridge_heads, dropout=m.dropout, token_pool=m.token_pool, token_drop=m.token_drop,
                query_drop=m.query_drop, zero_init=residual, positions=m.bridge_positions), m.input_norm)

        if residual:  # built in the heads method's order (item head, text head): one seed starts both alike
            pooled = PooledHead(head(d), m.bridge_base, m.input_norm)
            text = with_input_norm(dims.text_dim, head(dims.text_dim), m.input_norm)
            item = ResidualBridge(pooled, queries() if m.queries else None)
        else:
            item = queries()
            text = with_input_norm(dims.text_dim, head(dims.text_dim), m.input_norm)
        return DualEncoder(item, text, m.embed_dim, build_temperature(m.temperature, m.init_temperature))


register_method(BridgeMethod())
