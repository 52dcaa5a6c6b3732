"""`zeroshot`: a pretrained CLIP (or CLAP) evaluated as it is, the baseline row of every fine-tuning table.

Its "model" has no trainable part: the towers' projected embeddings (cached like any frozen
features) are the embeddings, compared with CLIP's trained logit scale. It cannot be trained;
`mmret eval --zero-shot clip-b32` makes a run folder for it so eval and search treat it as any run.
"""

from __future__ import annotations

from torch import nn

from mmret.errors import MmretError
from mmret.methods.config import ZeroShotConfig
from mmret.methods.features import FeatureContext, FeaturesMethod
from mmret.methods.registry import register_method
from mmret.models import DualEncoder
from mmret.models.temperature import build_temperature


class ZeroShotMethod(FeaturesMethod):
    name = "zeroshot"
    lr = 0.0
    config = ZeroShotConfig
    trainable = False

    def build(self, cfg, ctx: FeatureContext) -> DualEncoder:
        dims = ctx.dims
        if dims.item_dim != dims.text_dim:
            raise MmretError(f"zero-shot needs towers that share an embedding space; {cfg.encoders.item} gives "
                             f"{dims.item_dim} and {cfg.encoders.text} gives {dims.text_dim} dimensions")
        return DualEncoder(nn.Identity(), nn.Identity(), dims.item_dim, build_temperature("fixed", 0.01))


register_method(ZeroShotMethod())
