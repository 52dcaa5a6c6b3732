"""Trainable model parts and the dual encoder that joins two towers.

`heads` (projection heads, the shared `Mlp`), `bridge` (the querying bridge over token states),
`dual` (`DualEncoder`, the parameter table, and builders for the heads and bridge methods).
"""

from mmret.models.bridge import QueryBridge
from mmret.models.dual import (
    DualEncoder,
    DualOutput,
    PartCount,
    bridge_model,
    count_part,
    heads_model,
    parameter_table,
)
from mmret.models.heads import Mlp, ProjectionHead

__all__ = [
    "DualEncoder",
    "DualOutput",
    "Mlp",
    "PartCount",
    "ProjectionHead",
    "QueryBridge",
    "bridge_model",
    "count_part",
    "heads_model",
    "parameter_table",
]
