"""Gradient caching: a contrastive loss over a batch larger than what fits in memory at once.

`--batch-size` is the number of pairs in one loss (every pair sees the others as negatives);
`--micro-batch` is how many pass through the model with a graph at a time. `contrastive_step`
(Gao et al. 2021, GradCache) embeds the whole batch micro-batch by micro-batch without a graph,
takes the loss over the whole batch and its gradient with respect to the embeddings (the
temperature's parameters get theirs there too), then re-runs each micro-batch with a graph and
back-propagates the cached gradients. The parameter gradients equal those of one backward through
the whole batch. The CPU and CUDA RNG states are replayed per micro-batch so dropout draws the same
masks in both passes. BatchNorm (the from-scratch ResNet) normalises by micro-batch statistics,
so there the gradients are those of the whole-batch loss over micro-batch-normalised embeddings;
its running statistics move once per micro-batch (the first pass puts them back).

`accumulate_step` is plain gradient accumulation, kept for comparison and for users who ask for
it: each micro-batch's loss sees only its own negatives, which is a different objective.

Extra wrong captions (`--caption-negatives`) come as `negatives`, a text batch of their own: they
are embedded by `encode_text` like the captions (micro-batch by micro-batch under GradCache, their
gradients cached and replayed the same way, before the pass that ends the step) and handed to the
loss, which counts them as negatives only. Plain accumulation gives each micro-batch the negatives
of its own captions (`negative_owner`: the batch row each one belongs to).

The model offers `encode_item(x)`, `encode_text(x)` and `logit_scale_for(item_emb, text_emb)`
(as `DualEncoder` and `MiniCLIP` do). An input is a tensor, passed as is, or a dict of tensors,
passed as keywords; both are cut along dim 0.

On many processes (`mmret.training.world`) each process runs these steps over its slice of the
global batch, micro-batch by micro-batch: `loss_fn` (`ClipLoss` with `world_size` > 1) gathers the
embeddings of every process with gradient, so the cached gradients are those of the global loss,
and `sync_embed` is the DistributedDataParallel forward that the backward which ends the step goes
through (the whole batch's in `full_step`, the last micro-batch's replay here), so the gradients
are averaged once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import torch
from torch import Tensor, nn

from mmret.errors import MmretError
from mmret.models.batch import Batch, batch_size, call, slice_batch
from mmret.training.losses import ClipLoss

# (item_emb, text_emb, logit_scale_for[, positives=(B, B) bool]) -> loss, where logit_scale_for is
# the model's: (item_emb, text_emb) of the whole batch -> the logit scale (see `ClipLoss`)
LossFn = Callable[..., Tensor]
# (items, texts) -> (item_emb, text_emb) with a graph: how the pass whose backward ends the step embeds
Embed = Callable[[Batch, Batch], tuple[Tensor, Tensor]]
# a context manager entered once per forward (e.g. torch.autocast(...), which may be re-entered in
# turn), or a function that makes one (e.g. partial(torch.autocast, "cpu", dtype=torch.bfloat16))
Autocast = AbstractContextManager | Callable[[], AbstractContextManager]


def _spans(items: Batch, texts: Batch, micro_batch: int) -> list[tuple[int, int]]:
    n = batch_size(items)
    if batch_size(texts) != n:
        raise MmretError(f"a batch needs as many items as captions, got {n} and {batch_size(texts)}")
    if micro_batch < 1:
        raise MmretError(f"--micro-batch must be at least 1, got {micro_batch}")
    return [(a, min(a + micro_batch, n)) for a in range(0, n, micro_batch)]


def _enter(autocast: Autocast) -> AbstractContextManager:
    return autocast if isinstance(autocast, AbstractContextManager) else autocast()


def _embed(model: nn.Module, items: Batch, texts: Batch) -> tuple[Tensor, Tensor]:
    return call(model.encode_item, items), call(model.encode_text, texts)  # (b, D), (b, D)


def _embedder(model: nn.Module, sync_embed: Embed | None) -> Embed:
    return sync_embed or (lambda items, texts: _embed(model, items, texts))


def _backward(loss: Tensor, scaler: Any) -> None:
    (scaler.scale(loss) if scaler is not None else loss).backward()


def _cuda_devices() -> list[int]:
    # CUDA generators exist only once CUDA is initialised; before that nothing can draw from them
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return list(range(torch.cuda.device_count()))
    return []


class RngState:
    """The CPU and CUDA generator states at one moment, to run code again with the same draws."""

    def __init__(self) -> None:
        self.devices = _cuda_devices()
        self.cpu = torch.get_rng_state()
        self.cuda = [torch.cuda.get_rng_state(d) for d in self.devices]

    @contextmanager
    def replay(self) -> Iterator[None]:
        """Run the block from the saved state; afterwards the generators are as they were before."""
        with torch.random.fork_rng(devices=self.devices):
            torch.set_rng_state(self.cpu)
            for device, state in zip(self.devices, self.cuda):
                torch.cuda.set_rng_state(state, device)
            yield


def _loss(loss_fn: LossFn, model: nn.Module, item_emb: Tensor, text_emb: Tensor,
          positives: Tensor | None, negatives: Tensor | None = None) -> Tensor:
    """`loss_fn` over these embeddings; `positives` (pairs that are right beyond the diagonal) and
    `negatives` (embeddings of extra wrong captions) only when given. The loss computes the logit scale
    from the whole batch's embeddings (on many processes, the gathered ones)."""
    extra = {k: v for k, v in (("positives", positives), ("negatives", negatives)) if v is not None}
    return loss_fn(item_emb, text_emb, model.logit_scale_for, **extra)


def _embed_negatives(model: nn.Module, negatives: Batch | None, like: Tensor) -> Tensor | None:
    """(n, D) embeddings of the extra wrong captions (none: an empty (0, D), so that every process of
    a run still takes part in gathering them, and in the gather's backward when the captions'
    embeddings have a gradient)."""
    if negatives is None:
        return None
    if not batch_size(negatives):
        return like.new_zeros((0, like.shape[1])).requires_grad_(like.requires_grad)
    return call(model.encode_text, negatives)


def full_step(model: nn.Module, items: Batch, texts: Batch, *, loss_fn: LossFn = ClipLoss(),
              scaler: Any = None, autocast: Autocast = nullcontext, sync_embed: Embed | None = None,
              positives: Tensor | None = None, negatives: Batch | None = None) -> Tensor:
    """One forward and backward through the whole batch; returns the detached loss."""
    with _enter(autocast):
        item_emb, text_emb = _embedder(model, sync_embed)(items, texts)
        loss = _loss(loss_fn, model, item_emb, text_emb, positives, _embed_negatives(model, negatives, text_emb))
    _backward(loss, scaler)
    return loss.detach()


_NORM_STATS = ("running_mean", "running_var", "num_batches_tracked")


@contextmanager
def _keep_norm_stats(model: nn.Module) -> Iterator[None]:
    """Undo the running-statistics updates of BatchNorm layers in training mode made inside the block."""
    saved = [
        (m, {k: getattr(m, k).clone() for k in _NORM_STATS if isinstance(getattr(m, k, None), Tensor)})
        for m in model.modules()
        if m.training and getattr(m, "track_running_stats", False)
    ]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, buffers in saved:
                for k, v in buffers.items():
                    getattr(m, k).copy_(v)


def _embed_without_graph(
    model: nn.Module, items: Batch, texts: Batch, spans: list[tuple[int, int]], autocast: Autocast
) -> tuple[list[RngState], Tensor, Tensor]:
    """Pass 1: the embeddings of the whole batch, and the RNG state each micro-batch started from."""
    states, item_parts, text_parts = [], [], []
    # the replay pass updates BatchNorm running statistics; updating them here too would count twice
    with torch.no_grad(), _keep_norm_stats(model):
        for a, b in spans:
            states.append(RngState())
            with _enter(autocast):
                item_emb, text_emb = _embed(model, slice_batch(items, a, b), slice_batch(texts, a, b))
            item_parts.append(item_emb)
            text_parts.append(text_emb)
    return states, torch.cat(item_parts), torch.cat(text_parts)  # (B, D), (B, D)


def _batch_loss(model: nn.Module, item_emb: Tensor, text_emb: Tensor, *, loss_fn: LossFn, scaler: Any,
                autocast: Autocast, positives: Tensor | None,
                negatives: Tensor | None = None) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """The whole batch's loss, back-propagated into the temperature and the embedding leaves
    (the extra wrong captions' too, when given).

    The loss is scaled before backward, so a GradScaler's factor is in every cached gradient and
    in the temperature's, as in a plain scaled backward.
    """
    for leaf in (item_emb, text_emb, negatives):
        if leaf is not None:
            leaf.requires_grad_()
    with _enter(autocast):
        loss = _loss(loss_fn, model, item_emb, text_emb, positives, negatives)
    _backward(loss, scaler)
    return loss.detach(), item_emb.grad, text_emb.grad, None if negatives is None else negatives.grad


def _negative_spans(negatives: Batch | None, micro_batch: int) -> list[tuple[int, int]]:
    n = 0 if negatives is None else batch_size(negatives)
    return [(a, min(a + micro_batch, n)) for a in range(0, n, micro_batch)]


def _embed_negatives_without_graph(model: nn.Module, negatives: Batch | None, spans: list[tuple[int, int]],
                                   autocast: Autocast, like: Tensor) -> tuple[list[RngState], Tensor | None]:
    """Pass 1 for the extra wrong captions, micro-batch by micro-batch (None: there are none to take)."""
    if negatives is None:
        return [], None
    states, parts = [], []
    with torch.no_grad(), _keep_norm_stats(model):
        for a, b in spans:
            states.append(RngState())
            with _enter(autocast):
                parts.append(call(model.encode_text, slice_batch(negatives, a, b)))
    return states, torch.cat(parts) if parts else like.new_zeros((0, like.shape[1]))


def _replay_negatives(model: nn.Module, negatives: Batch, spans: list[tuple[int, int]], states: list[RngState],
                      grad: Tensor | None, autocast: Autocast) -> None:
    """Carry the cached gradients of the extra wrong captions into the weights (before the replay whose
    backward ends the step: on many processes that one averages whatever has been accumulated)."""
    if grad is None:
        return
    for (a, b), state in zip(spans, states):
        with state.replay(), _enter(autocast):
            part = call(model.encode_text, slice_batch(negatives, a, b))
        if part.requires_grad:
            (part.float() * grad[a:b].float()).sum().backward()


def contrastive_step(
    model: nn.Module,
    items: Batch,
    texts: Batch,
    micro_batch: int,
    *,
    loss_fn: LossFn = ClipLoss(),
    scaler: Any = None,
    autocast: Autocast = nullcontext,
    sync_embed: Embed | None = None,
    positives: Tensor | None = None,
    negatives: Batch | None = None,
    negative_owner: Tensor | None = None,
) -> Tensor:
    """Add to `.grad` what `loss_fn` over the whole batch would, holding one micro-batch's graph at a time.

    `scaler` is a GradScaler (or None): gradients come out scaled, ready for `scaler.step`.
    `autocast` is the context each forward and the loss run in. `sync_embed` embeds the last
    micro-batch's replay (default: the model itself). `positives` (B, B) bool marks pairs beyond
    the diagonal that the loss counts as right; `negatives` is a text batch of extra wrong captions
    (`negative_owner` is read by plain accumulation only). Returns the detached, unscaled loss.
    """
    spans = _spans(items, texts, micro_batch)
    if len(spans) == 1:
        return full_step(model, items, texts, loss_fn=loss_fn, scaler=scaler, autocast=autocast,
                         sync_embed=sync_embed, positives=positives, negatives=negatives)
    states, item_emb, text_emb = _embed_without_graph(model, items, texts, spans, autocast)
    neg_spans = _negative_spans(negatives, micro_batch)
    neg_states, neg_emb = _embed_negatives_without_graph(model, negatives, neg_spans, autocast, text_emb)
    loss, g_item, g_text, g_neg = _batch_loss(model, item_emb, text_emb, loss_fn=loss_fn, scaler=scaler,
                                              autocast=autocast, positives=positives, negatives=neg_emb)
    _replay_negatives(model, negatives, neg_spans, neg_states, g_neg, autocast)
    for n, ((a, b), state) in enumerate(zip(spans, states)):
        embed = _embedder(model, sync_embed if n == len(spans) - 1 else None)
        with state.replay(), _enter(autocast):
            item_part, text_part = embed(slice_batch(items, a, b), slice_batch(texts, a, b))
        # d(surrogate)/d(embedding) is the cached gradient, so backward carries it into the weights
        surrogate = sum(
            (part.float() * grad[a:b].float()).sum()
            for part, grad in ((item_part, g_item), (text_part, g_text))
            if grad is not None and part.requires_grad
        )
        if isinstance(surrogate, Tensor):  # else no trainable part before the embeddings
            surrogate.backward()
    return loss


def accumulate_step(
    model: nn.Module,
    items: Batch,
    texts: Batch,
    micro_batch: int,
    *,
    loss_fn: LossFn = ClipLoss(),
    scaler: Any = None,
    autocast: Autocast = nullcontext,
    sync_embed: Embed | None = None,
    positives: Tensor | None = None,
    negatives: Batch | None = None,
    negative_owner: Tensor | None = None,
) -> Tensor:
    """Plain gradient accumulation: the size-weighted mean of per-micro-batch losses.

    Each micro-batch's pairs see only that micro-batch's negatives (and a dynamic temperature only
    its similarities), so with micro < batch this is a weaker objective than `contrastive_step`;
    it is here for comparison and on request. Returns the detached, unscaled loss.
    """
    spans = _spans(items, texts, micro_batch)
    n, losses = spans[-1][1], []
    for a, b in spans:
        part = None if positives is None else positives[a:b, a:b]
        mine = None if negatives is None else _take(negatives, (negative_owner >= a) & (negative_owner < b))
        loss = full_step(model, slice_batch(items, a, b), slice_batch(texts, a, b),
                         loss_fn=lambda i, t, s, **kw: loss_fn(i, t, s, **kw) * ((b - a) / n), scaler=scaler,
                         autocast=autocast, sync_embed=sync_embed if b == n else None, positives=part,
                         negatives=mine)
        losses.append(loss)
    return torch.stack(losses).sum()


def _take(x: Batch, rows: Tensor) -> Batch:
    """The rows of a tensor, or of each tensor of a dict, where `rows` (bool) is True."""
    return {k: v[rows] for k, v in x.items()} if isinstance(x, Mapping) else x[rows]
