"""The contrastive loss: symmetric InfoNCE over the batch similarity matrix, as in CLIP.

Pair i (image i, caption i) is the positive; every other image or caption in the batch is a
negative. This is open_clip's `ClipLoss` on one device, in a few lines: the loss sees exactly the
negatives in the tensors it is given, which is why `gradcache.py` exists.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def clip_logits(image_emb: Tensor, text_emb: Tensor, logit_scale: Tensor | float) -> Tensor:
    """Scaled similarities (B_img, B_txt); row i = image i against every caption."""
    return logit_scale * image_emb @ text_emb.T  # (B, B)


def clip_loss(image_emb: Tensor, text_emb: Tensor, logit_scale: Tensor | float) -> Tensor:
    """Mean of image→text and text→image cross-entropy, with pair i as the positive of row i.

    `image_emb`, `text_emb`: (B, D), normally L2-normalised. `logit_scale` is the multiplier
    (exp of the learnable log-scale, 1/temperature), as open_clip passes it, not its logarithm.
    """
    logits = clip_logits(image_emb, text_emb, logit_scale)  # (B, B)
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
