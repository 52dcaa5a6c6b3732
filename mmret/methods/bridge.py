"""`bridge`: the querying bridge, a small BLIP-2 Q-Former over a frozen item tower's tokens.

K learnable queries attend over the cached token states through L blocks and are pooled into
the shared space; the text side is a projection head over the pooled caption feature. Only the
bridge, the text head, their input norms and the temperature train.
"""

from __future__ import annotations

from dataclasses import dataclass

from mmret.errors import MmretError
from mmret.methods.catalog import help_of
from mmret.methods.base import check_positive, register_method
from mmret.methods.features import FeatureContext
from mmret.methods.heads import HeadsConfig, HeadsMethod, with_input_norm
from mmret.models import DualEncoder, ProjectionHead, QueryBridge
from mmret.models.temperature import build_temperature


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
