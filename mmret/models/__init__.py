"""Trainable model parts and the dual encoder that joins two towers.

`heads` (projection heads, the shared `Mlp`), `bridge` (the querying bridge over token states),
`dual` (`DualEncoder` and the parameter table), `towers` (a pretrained tower with its head),
`miniclip`, `linformer`, `scratch_clip` (from-scratch models), `temperature`, `mixup` (latent
mixup of cached features), `batch` and `embed` (batches, and embedding a whole source), and
`tuners` (LoRA, prompt tokens and adapters put inside a pretrained tower).
"""

from mmret.models.bridge import QueryBridge, ResidualBridge
from mmret.models.dual import (
    DualEncoder,
    DualOutput,
    PartCount,
    count_part,
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
    "ResidualBridge",
    "count_part",
    "parameter_table",
]
