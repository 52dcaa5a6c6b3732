"""The contrastive loss: symmetric InfoNCE over the batch similarity matrix, as in CLIP.

Pair i (item i, caption i) is the positive; every other item or caption in the batch is a
negative. This is open_clip's `ClipLoss` on one device, in a few lines: the loss sees exactly the
negatives in the tensors it is given, which is why `gradcache.py` exists.

Two changes to that, both off unless asked for:

- `positives` (B, B) bool marks more positives than the diagonal: pair j's caption is also right
  for picture i (the same text, "A flower.", under two pictures). Those pairs are not pushed
  apart; each row's loss is `-log(sum over its positives / sum over the row)`, the multi-positive
  form of the cross-entropy (SupCon's "outside" sum, one term per row).
- `hn_beta` > 0 reweights the negatives of each row by `softmax(beta * logits)` (times their
  count, so the weights average 1), as HN-NCE does (Radenovic et al. 2023, after Robinson et al.
  2021): negatives that already score high count more. The weights are an importance-sampling
  distribution, so no gradient flows through them (detached). beta = 0 is plain InfoNCE.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def clip_logits(item_emb: Tensor, text_emb: Tensor, logit_scale: Tensor | float) -> Tensor:
    """Scaled similarities (B_item, B_txt); row i = item i against every caption."""
    return logit_scale * item_emb @ text_emb.T  # (B, B)


def clip_loss(item_emb: Tensor, text_emb: Tensor, logit_scale: Tensor | float,
              positives: Tensor | None = None, hn_beta: float = 0.0) -> Tensor:
    """Mean of item→text and text→item cross-entropy, with pair i as the positive of row i.

    `item_emb`, `text_emb`: (B, D), normally L2-normalised. `logit_scale` is the multiplier
    (exp of the learnable log-scale, 1/temperature), as open_clip passes it, not its logarithm.
    `positives` (B, B) bool: further right pairs (the diagonal always is); `hn_beta`: HN-NCE weighting.
    """
    logits = clip_logits(item_emb, text_emb, logit_scale)  # (B, B)
    if positives is None and not hn_beta:
        labels = torch.arange(logits.shape[0], device=logits.device)
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    eye = torch.eye(logits.shape[0], dtype=torch.bool, device=logits.device)
    pos = eye if positives is None else positives.to(device=logits.device, dtype=torch.bool) | eye
    return (_row_loss(logits, pos, hn_beta) + _row_loss(logits.T, pos.T, hn_beta)) / 2


def _row_loss(logits: Tensor, pos: Tensor, beta: float) -> Tensor:
    """Mean over rows of -log(sum_pos e^l / (sum_pos e^l + sum_neg w e^l))."""
    return row_losses(logits, pos, beta).mean()


def row_losses(logits: Tensor, pos: Tensor, beta: float = 0.0) -> Tensor:
    """(R,) each row's -log(sum_pos e^l / (sum_pos e^l + sum_neg w e^l)) for (R, C) `logits` and
    `pos` (R, C) bool, every row with at least one positive (a distributed loss passes its own rows
    against the columns of every process)."""
    logits = logits.float()
    pos_term = logits.masked_fill(~pos, -math.inf).logsumexp(1)  # (R,)
    neg = logits.masked_fill(pos, -math.inf)  # (R, C)
    if beta:
        n_neg = (~pos).sum(1, keepdim=True).clamp(min=1)
        # log of weights that average 1 over each row's negatives: log(n) + log softmax(beta * l)
        log_w = torch.log_softmax(beta * neg.detach(), dim=1) + n_neg.log()
        neg = neg + log_w.masked_fill(pos, 0.0)
    neg_term = neg.logsumexp(1)  # -inf for a row without negatives
    return torch.logaddexp(pos_term, neg_term) - pos_term
