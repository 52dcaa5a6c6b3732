"""The contrastive loss: symmetric InfoNCE over the batch similarity matrix, as in CLIP, on one
process or many: open_clip's `ClipLoss(local_loss, gather_with_grad, rank, world_size)`.

Pair i (item i, caption i) is the positive; every other item or caption in the batch is a
negative. The loss sees exactly the negatives in the tensors it is given, which is why
`gradcache.py` exists.

Three changes to CLIP's loss, all off unless asked for:

- `positives` (B, B) bool marks more positives than the diagonal: pair j's caption is also right
  for picture i (the same text, "A flower.", under two pictures). Those pairs are not pushed
  apart; each row's loss is `-log(sum over its positives / sum over the row)`, the multi-positive
  form of the cross-entropy (SupCon's "outside" sum, one term per row).
- `hn_beta` > 0 reweights the negatives of each row by `softmax(beta * logits)` (times their
  count, so the weights average 1), as HN-NCE does (Radenovic et al. 2023, after Robinson et al.
  2021): negatives that already score high count more. The weights are an importance-sampling
  distribution, so no gradient flows through them (detached). beta = 0 is plain InfoNCE.
- `negatives` (n, D) are embeddings of extra captions that are right for no item of the batch
  (generated wrong captions, `--caption-negatives`): NegCLIP's hard negatives (Yuksekgonul et al.
  2023). They are extra columns of every item's row, so item→text must rank each item's caption
  above them; they are never rows, so text→item is CLIP's.

On many processes (`world_size` > 1) each process passes its slice of the global batch; the
slices of every process are all-gathered in rank order (they may differ in size by a row or more)
and `positives` is the global batch's (B, B). With `local_loss` a process scores only its own rows
against every column, its labels offset by the rows before it; without, every process scores the
whole (B, B). Either way the loss is weighted so that its mean over the processes, which is what
DistributedDataParallel's gradient averaging takes, is the one-process loss over the global batch.
With `gather_with_grad` the gradients are exactly the one-process gradients too: the gather's
backward sends each process the gradient of its own rows, summed over the processes. Without it
only the process's own rows carry gradient: the whole-matrix loss then steps with 1/world_size of
the gradient, the local loss misses the terms other processes' rows hold (open_clip's defaults,
kept for comparison; training uses both flags).
"""

from __future__ import annotations

import math
import warnings
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# the logit scale (1/temperature) as a number, or computed from the whole batch's embeddings (a
# dynamic temperature reads their similarities: on many processes, the gathered ones)
Scale = Tensor | float | Callable[[Tensor, Tensor], Tensor]


class ClipLoss(nn.Module):
    """Mean of item→text and text→item cross-entropy over the (global) batch, pair i the positive
    of row i; see the module docstring for `local_loss`, `gather_with_grad`, `rank`, `world_size`
    and `hn_beta`."""

    def __init__(self, *, local_loss: bool = False, gather_with_grad: bool = False, rank: int = 0,
                 world_size: int = 1, hn_beta: float = 0.0):
        super().__init__()
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not a process of a world of {world_size}")
        self.local_loss, self.gather_with_grad = local_loss, gather_with_grad
        self.rank, self.world_size, self.hn_beta = rank, world_size, hn_beta

    def forward(self, item_emb: Tensor, text_emb: Tensor, logit_scale: Scale,
                positives: Tensor | None = None, negatives: Tensor | None = None) -> Tensor:
        """`item_emb`, `text_emb`: (b, D) this process's pairs, normally L2-normalised. `logit_scale`
        is the multiplier (exp of the learnable log-scale), as open_clip passes it, or a function of
        the whole batch's (item, text) embeddings that returns it. `positives` (B, B) bool: further
        right pairs of the global batch (the diagonal always is). `negatives` (n, D): this process's
        extra wrong captions (possibly none), gathered like the pairs."""
        per_item, per_text, start = self.logits(item_emb, text_emb, logit_scale, negatives)  # (R, B [+ N]), (R, B)
        rows, total = per_text.shape
        labels = torch.arange(start, start + rows, device=per_item.device)
        if positives is None and not self.hn_beta:
            item_sum, text_sum = (F.cross_entropy(x, labels, reduction="sum") for x in (per_item, per_text))
        else:
            pos_item, pos_text = _row_positives(positives, labels, total)
            pos_item = F.pad(pos_item, (0, per_item.shape[1] - total))  # the extra captions are never right
            item_sum = _row_losses(per_item, pos_item, self.hn_beta).sum()
            text_sum = _row_losses(per_text, pos_text, self.hn_beta).sum()
        shares = self.world_size if self._local else 1  # processes whose losses DDP averages into one
        return (item_sum + text_sum) * (shares / (2 * total))

    @property
    def _local(self) -> bool:
        return self.local_loss and self.world_size > 1

    def logits(self, item_emb: Tensor, text_emb: Tensor, logit_scale: Scale,
               negatives: Tensor | None = None) -> tuple[Tensor, Tensor, int]:
        """(item rows, caption rows, where the rows start in the global batch): this process's rows
        against every column with `local_loss`, else the whole batch's (alone: the whole batch). The
        item rows have a column per extra wrong caption after the batch's captions."""
        all_items, all_texts, start = self.gather(item_emb, text_emb)  # (B, D), (B, D)
        scale = logit_scale(all_items, all_texts) if callable(logit_scale) else logit_scale
        columns = all_texts if negatives is None else torch.cat([all_texts, self.gather_one(negatives)])  # (B + N, D)
        if self._local:
            return scale * item_emb @ columns.T, scale * text_emb @ all_items.T, start
        per_item = scale * all_items @ columns.T  # (B, B + N)
        return per_item, per_item[:, :len(all_texts)].T, 0

    def gather(self, item_emb: Tensor, text_emb: Tensor) -> tuple[Tensor, Tensor, int]:
        """Every process's embeddings in rank order, and where this process's rows start."""
        if self.world_size == 1:
            return item_emb, text_emb, 0
        sizes = _sizes(len(item_emb), item_emb.device, self.world_size)
        return (_gather(item_emb, sizes, self.rank, self.gather_with_grad),
                _gather(text_emb, sizes, self.rank, self.gather_with_grad), sum(sizes[:self.rank]))

    def gather_one(self, x: Tensor) -> Tensor:
        """Every process's rows of `x` in rank order (the processes may hold different numbers)."""
        if self.world_size == 1:
            return x
        sizes = _sizes(len(x), x.device, self.world_size)
        return _gather(x, sizes, self.rank, self.gather_with_grad) if max(sizes) else x


def _sizes(n: int, device: torch.device, world_size: int) -> list[int]:
    """How many rows every process holds."""
    counts = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(world_size)]
    torch.distributed.all_gather(counts, torch.tensor([n], dtype=torch.long, device=device))
    return [int(c) for c in counts]


def _gather(x: Tensor, sizes: list[int], rank: int, with_grad: bool) -> Tensor:
    """(sum(sizes), D): every process's rows of `x`. The all-gather needs equal shapes, so each
    process pads to the largest slice and the padding is cut away after."""
    padded = F.pad(x, (0, 0, 0, max(sizes) - len(x))).contiguous()
    if with_grad:
        with warnings.catch_warnings():  # open_clip's gather_with_grad; torch suggests a private module instead
            warnings.simplefilter("ignore", FutureWarning)
            parts = list(torch.distributed.nn.functional.all_gather(padded))
    else:
        parts = [torch.empty_like(padded) for _ in sizes]
        torch.distributed.all_gather(parts, padded.detach())
        parts[rank] = padded  # the own rows keep their graph
    return torch.cat([p[:n] for p, n in zip(parts, sizes)])


def _row_positives(positives: Tensor | None, labels: Tensor, total: int) -> tuple[Tensor, Tensor]:
    """(R, B) bool right columns of the item rows and of the caption rows `labels` of the global batch."""
    eye = torch.zeros(len(labels), total, dtype=torch.bool, device=labels.device)
    eye[torch.arange(len(labels), device=labels.device), labels] = True
    if positives is None:
        return eye, eye
    pos = positives.to(device=labels.device, dtype=torch.bool)
    return pos[labels] | eye, pos.T[labels] | eye


def _row_losses(logits: Tensor, pos: Tensor, beta: float) -> Tensor:
    """(R,) each row's -log(sum_pos e^l / (sum_pos e^l + sum_neg w e^l)) for (R, C) `logits` and
    `pos` (R, C) bool, every row with at least one positive."""
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
