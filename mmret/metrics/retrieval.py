"""Retrieval metrics for item–text search: a rank per query, then recalls, MRR, median rank,
mAP and RSUM, with seeded bootstrap confidence intervals and paired comparisons of two runs.

Protocol (CLIP paper, CLIP_benchmark; for sounds the same one Clotho and DCASE use): every caption
is a text→item query with exactly one right item; every item is an item→text query whose right
answers are all of its captions, and it is a hit at k when any of them is in the top k.
Item→text mAP ranks all of an item's captions.

mAP@k (`map_at`, DCASE's mAP@10 for sounds): text→item, with its one right item, scores 1/rank
when the rank is at most k and 0 otherwise, as DCASE's evaluation script computes it (the sum
over the right items in the top k of hits-so-far / position); item→text, with several right
captions, is that sum divided by min(captions, k), the usual AP@k, so a perfect ranking scores 1.

Metric names say which way and what the items are: `t2i_r1`, `i2t_map` for pictures; `t2a_r1`,
`a2t_map`, `t2a_map10` for sounds (`item`, the modality's letter).

Scores are dot products (of normalised embeddings: cosine similarity) computed in float32, one
block of query rows at a time, so a COCO 5K test never holds its 5000 x 25010 score matrix.

Tie rule (pessimistic): a wrong item that scores exactly as high as a right one is ranked above
it, so rank = 1 + the number of wrong items scoring >= the right one. It is deterministic, it
cannot flatter a collapsed model whose scores are all equal, and without ties it agrees with any
tie order (CLIP_benchmark's `torch.topk` leaves the order of ties undefined). A tie means equal
float32 scores: two identical items may still differ in the last bit, since BLAS kernels do
not promise the same summation order for every column.

Values: `*_r{k}`, `*_mrr`, `i2t_map` and `*_map{k}` are fractions in [0, 1]; `*_medr` is a rank (the lower
median: the smallest rank that at least half of the queries reach); `rsum` is the sum of the
recalls of both directions in percent (600 is perfect with the default ks 1, 5, 10).
Per-query ranks are kept so that `bootstrap_ci` and `paired_bootstrap` can resample queries.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from mmret.errors import MmretError

DEFAULT_KS = (1, 5, 10)
_BLOCK_ELEMENTS = 1 << 24  # scores per block (64 MB of float32): bounded memory, still large BLAS calls
_BOOT_BATCH = 100  # bootstrap replicates resampled at once: (100, n_queries) int64 weights
UNITS = ("item", "query")

Block = Callable[[int, int], torch.Tensor]  # (start, end) -> float32 scores of query rows start:end


@dataclass(frozen=True)
class RetrievalResult:
    metrics: dict[str, float]  # see the module docstring for names and units
    t2i_ranks: torch.Tensor  # (n_text,) int64: 1-based rank of each caption's item among all items
    i2t_ranks: torch.Tensor  # (n_item,) int64: 1-based rank of each item's best caption; 0 = it has none
    i2t_ap: torch.Tensor  # (n_item,) float64: average precision over each item's captions; nan = none
    text_item: torch.Tensor  # (n_text,) int64: the item (row of item_emb) each caption describes
    ks: tuple[int, ...]
    item: str = "i"  # the items' letter in metric names: t2i / i2t, t2a / a2t
    map_at: tuple[int, ...] = ()  # mAP@k cut-offs reported besides the full mAP
    i2t_ap_at: torch.Tensor | None = None  # (n_item, len(map_at)) float64 item→text AP@k; nan = no captions


@dataclass(frozen=True)
class PairedDiff:
    delta: float  # metric of run b minus metric of run a, on all queries
    low: float  # bootstrap confidence interval of delta
    high: float
    p_value: float  # two-sided: how often resampling gives a difference of the other sign

    @property
    def significant(self) -> bool:
        """True when the confidence interval of the difference excludes zero."""
        return self.low > 0 or self.high < 0


def retrieval_metrics(
    item_emb: torch.Tensor, text_emb: torch.Tensor, text_item: torch.Tensor, *,
    ks: Sequence[int] = DEFAULT_KS, chunk: int | None = None, item: str = "i", map_at: Sequence[int] = (),
) -> RetrievalResult:
    """Rank every caption's item and every item's captions; `chunk` = query rows per block.

    item_emb (n_item, D) and text_emb (n_text, D) are normalised embeddings of any float dtype;
    text_item (n_text,) gives the row of item_emb that each caption describes. `item` is the
    letter metric names give the items (i, a); `map_at` adds mAP@k for each k (see above).
    """
    n_item, n_text = _check_embeddings(item_emb, text_emb)
    text_item = _check_text_item(text_item, n_text, n_item)
    map_at = _check_ks(map_at) if map_at else ()
    item32, text32 = item_emb.float(), text_emb.float()  # exact for float16 inputs
    t2i = _t2i_ranks(lambda s, e: text32[s:e] @ item32.T, text_item.to(text32.device), n_item, chunk)
    i2t, ap, ap_at = _i2t_ranks(lambda s, e: item32[s:e] @ text32.T, text_item.to(text32.device), n_item, chunk,
                                map_at)
    return _result(t2i, i2t, ap, text_item, ks=ks, item=item, map_at=map_at, ap_at=ap_at)


def metrics_from_scores(
    scores: torch.Tensor, text_item: torch.Tensor, *, ks: Sequence[int] = DEFAULT_KS, chunk: int | None = None,
    item: str = "i", map_at: Sequence[int] = (),
) -> RetrievalResult:
    """The same metrics from a given (n_text, n_item) score matrix, e.g. from a re-ranker."""
    if scores.ndim != 2 or 0 in scores.shape:
        raise MmretError(f"scores must be a non-empty (n_text, n_item) matrix, got shape {tuple(scores.shape)}")
    if not torch.isfinite(scores).all():
        raise MmretError("the score matrix holds NaN or inf values; check the model that produced it")
    n_text, n_item = scores.shape
    text_item = _check_text_item(text_item, n_text, n_item)
    gt = text_item.to(scores.device)
    map_at = _check_ks(map_at) if map_at else ()
    t2i = _t2i_ranks(lambda s, e: scores[s:e].float(), gt, n_item, chunk)
    i2t, ap, ap_at = _i2t_ranks(lambda s, e: scores[:, s:e].T.float(), gt, n_item, chunk, map_at)
    return _result(t2i, i2t, ap, text_item, ks=ks, item=item, map_at=map_at, ap_at=ap_at)


def metrics_from_ranks(
    t2i_ranks: torch.Tensor, i2t_ranks: torch.Tensor, i2t_ap: torch.Tensor, *, ks: Sequence[int] = DEFAULT_KS,
    item: str = "i", map_at: Sequence[int] = (), i2t_ap_at: torch.Tensor | None = None,
) -> dict[str, float]:
    """Recalls, MRR, median ranks, mAP and RSUM from per-query ranks (items of rank 0 are skipped);
    mAP@k for each of `map_at` when `i2t_ap_at` (n_item, len(map_at)) is given."""
    ks = _check_ks(ks)
    w_text = torch.ones(1, len(t2i_ranks), dtype=torch.int64)
    w_item = (i2t_ranks > 0).to(torch.int64)[None]
    stats = _weighted_metrics(t2i_ranks, i2t_ranks, i2t_ap, w_text=w_text, w_item=w_item, ks=ks, item=item,
                              map_at=tuple(map_at), i2t_ap_at=i2t_ap_at)
    return {name: value.item() for name, value in stats.items()}


def same_text_metrics(
    item_emb: torch.Tensor, text_emb: torch.Tensor, text_item: torch.Tensor, text_key: torch.Tensor, *,
    ks: Sequence[int] = DEFAULT_KS, chunk: int | None = None, item: str = "i",
) -> dict[str, float]:
    """Recalls, MRR and median ranks when captions with the same text count as one answer (metric
    names after the items: `item` "i" gives t2i / i2t, "a" t2a / a2t).

    `text_key` (n_text,) is equal for captions of the same text (`mmret.data.negatives.caption_keys`).
    A caption's right items are all the items that have a caption of its text ("A flower."
    under six pictures: any of the six is right); an item's right captions are all captions with
    the text of one of its own. Without shared texts this equals `retrieval_metrics` (without mAP).
    The usual protocol (`retrieval_metrics`) counts only a caption's own picture: two pictures with
    the same caption then cannot both be found first, whatever the model.
    """
    n_item, n_text = _check_embeddings(item_emb, text_emb)
    text_item = _check_text_item(text_item, n_text, n_item)
    key = torch.as_tensor(text_key).long()
    if key.shape != (n_text,):
        raise MmretError(f"text_key must hold one key per caption ({n_text}), got shape {tuple(key.shape)}")
    groups = torch.unique(key, return_inverse=True)[1]
    has = torch.zeros(n_item, int(groups.max()) + 1, dtype=torch.bool)
    has[text_item, groups] = True  # (n_item, n_groups): item i has a caption of text g
    item32, text32 = item_emb.float().cpu(), text_emb.float().cpu()
    t2i = _ranks_among(lambda s, e: text32[s:e] @ item32.T, lambda s, e: has[:, groups[s:e]].T, n_text, n_item, chunk)
    i2t = _ranks_among(lambda s, e: item32[s:e] @ text32.T, lambda s, e: has[s:e][:, groups], n_item, n_text, chunk)
    out = metrics_from_ranks(t2i, i2t, torch.zeros(n_item, dtype=torch.float64), ks=ks, item=item)
    out.pop(f"{directions(item)[1]}_map")
    return out


def _ranks_among(block: Block, right: Block, n_rows: int, n_cols: int, chunk: int | None) -> torch.Tensor:
    """1 + the wrong columns scoring >= the best right one, for each row (pessimistic ties)."""
    rows = _rows_per_block(chunk, n_cols)
    ranks = torch.empty(n_rows, dtype=torch.int64)
    for start in range(0, n_rows, rows):
        end = min(start + rows, n_rows)
        scores, ok = block(start, end), right(start, end)  # (c, n_cols) each
        best = scores.masked_fill(~ok, float("-inf")).max(1, keepdim=True).values
        ranks[start:end] = 1 + ((scores >= best) & ~ok).sum(1)
    return ranks


def bootstrap_ci(
    result: RetrievalResult, *, n_boot: int = 1000, seed: int = 0, level: float = 0.95, unit: str = "item",
) -> dict[str, tuple[float, float]]:
    """Percentile confidence interval of every metric from `n_boot` resamples of the queries.

    unit="item" resamples items and takes each drawn item's captions with it (captions of one
    picture succeed or fail together, so resampling them one by one would understate the spread);
    unit="query" resamples captions and items independently. Same seed, same intervals.
    """
    (reps,) = _replicates([result], n_boot, seed, unit)
    return {name: _percentile_interval(values, level) for name, values in reps.items()}


def paired_bootstrap(
    a: RetrievalResult, b: RetrievalResult, *, n_boot: int = 1000, seed: int = 0, level: float = 0.95,
    unit: str = "item",
) -> dict[str, PairedDiff]:
    """Whether run b differs from run a on the same queries: both are scored on the same resamples."""
    if (not torch.equal(a.text_item, b.text_item) or len(a.i2t_ranks) != len(b.i2t_ranks) or a.ks != b.ks
            or (a.item, a.map_at) != (b.item, b.map_at)):
        raise MmretError("the two runs were not evaluated on the same queries (same dataset, split "
                         "and ks); evaluate both on the same split and compare again")
    reps_a, reps_b = _replicates([a, b], n_boot, seed, unit)
    out = {}
    for name, va in reps_a.items():
        diff = reps_b[name] - va  # (n_boot,)
        beyond = min(int((diff <= 0).sum()), int((diff >= 0).sum()))
        low, high = _percentile_interval(diff, level)
        p_value = min(1.0, 2 * (beyond + 1) / (n_boot + 1))  # +1: a resample can never prove p = 0
        out[name] = PairedDiff(b.metrics[name] - a.metrics[name], low, high, p_value)
    return out


# --- ranks -------------------------------------------------------------------------------------


def _rows_per_block(chunk: int | None, n_cols: int) -> int:
    if chunk is not None and chunk < 1:
        raise MmretError(f"chunk must be a positive number of rows, got {chunk}")
    return chunk or max(1, _BLOCK_ELEMENTS // n_cols)


def _t2i_ranks(block: Block, text_item: torch.Tensor, n_item: int, chunk: int | None) -> torch.Tensor:
    n_text = len(text_item)
    rows = _rows_per_block(chunk, n_item)
    ranks = torch.empty(n_text, dtype=torch.int64)
    flags = None
    for start in range(0, n_text, rows):
        scores = block(start, start + rows)  # (c, n_item)
        flags = _flags_for(scores, flags)
        right = scores.gather(1, text_item[start:start + rows, None])  # (c, 1)
        # counts the right item itself and every item tied with it: the pessimistic rank
        ranks[start:start + rows] = _count_at_least(scores, right, flags).cpu()
    return ranks


def _flags_for(scores: torch.Tensor, flags: torch.Tensor | None) -> torch.Tensor:
    """A scratch buffer for `_count_at_least`, reused across blocks: a fresh 64 MB tensor per
    call costs more in page faults than the comparison itself."""
    if flags is None or flags.shape[0] < scores.shape[0]:
        dtype = torch.float32 if scores.shape[1] < 2**24 else torch.float64  # exact integer counts
        flags = torch.empty(scores.shape, dtype=dtype, device=scores.device)
    return flags


def _count_at_least(scores: torch.Tensor, threshold: torch.Tensor, flags: torch.Tensor) -> torch.Tensor:
    """(c,) int64 entries of each row >= its threshold. Summing 0/1 floats is several times faster
    than summing booleans on CPU."""
    return torch.ge(scores, threshold, out=flags[:len(scores)]).sum(1).long()


def _i2t_ranks(block: Block, text_item: torch.Tensor, n_item: int, chunk: int | None,
               map_at: tuple[int, ...] = ()):
    positives, n_pos = _captions_per_item(text_item, n_item)  # (n_item, P), (n_item,)
    rows = _rows_per_block(chunk, len(text_item))
    ranks = torch.zeros(n_item, dtype=torch.int64)
    ap = torch.full((n_item,), float("nan"), dtype=torch.float64)
    ap_at = torch.full((n_item, len(map_at)), float("nan"), dtype=torch.float64) if map_at else None
    flags = None
    for start in range(0, n_item, rows):
        end = min(start + rows, n_item)
        scores = block(start, end)  # (c, n_text)
        flags = _flags_for(scores, flags)
        ranks[start:end], ap[start:end], rank = _i2t_block(scores, positives[start:end], n_pos[start:end], flags)
        if map_at:
            ap_at[start:end] = _ap_at(rank, n_pos[start:end], map_at)
    return ranks, ap, ap_at


def _captions_per_item(text_item: torch.Tensor, n_item: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(n_item, P) caption indices of each item padded with 0, and (n_item,) how many are real."""
    device = text_item.device
    n_pos = torch.bincount(text_item, minlength=n_item)
    order = torch.argsort(text_item, stable=True)  # captions grouped by item
    first = torch.cumsum(n_pos, 0) - n_pos  # where each item's group starts in `order`
    slot = torch.arange(len(order), device=device) - first[text_item[order]]
    positives = torch.zeros(n_item, max(1, int(n_pos.max())), dtype=torch.int64, device=device)
    positives[text_item[order], slot] = order
    return positives, n_pos


def _i2t_block(scores: torch.Tensor, positives: torch.Tensor, n_pos: torch.Tensor, flags: torch.Tensor):
    """Best-caption rank and average precision of each item row of a (c, n_text) score block."""
    c, width = positives.shape
    slots = torch.arange(width, device=scores.device)
    real = slots < n_pos[:, None]  # (c, P)
    pos = scores.gather(1, positives).masked_fill(~real, float("-inf"))
    pos = pos.sort(1, descending=True).values  # (c, P) right captions, best first
    # right captions scoring >= each of them (ties between right captions do not change AP)
    pos_ge = torch.searchsorted(-pos, -pos, right=True)  # (c, P)
    all_ge = torch.zeros(c, width, dtype=torch.int64, device=scores.device)
    for j in range(width):  # one pass per caption slot, over the items that have that many captions
        has = (n_pos > j).nonzero().squeeze(1)
        sub = scores if len(has) == c else scores[has]
        all_ge[has, j] = _count_at_least(sub, pos[has, j:j + 1], flags)
    rank = all_ge - pos_ge + slots + 1  # (c, P) wrong captions above, plus the right ones so far
    precision = torch.where(real, (slots + 1) / rank.clamp(min=1).double(), 0.0)  # padding slots add 0
    ap = precision.sum(1) / n_pos  # 0 / 0 = nan for an item without captions
    return torch.where(n_pos > 0, rank[:, 0], 0).cpu(), ap.cpu(), torch.where(real, rank, 0)


def _ap_at(rank: torch.Tensor, n_pos: torch.Tensor, map_at: tuple[int, ...]) -> torch.Tensor:
    """(c, len(map_at)) AP@k from each item's right captions' ranks (c, P), best first (0 = padding):
    precision at each right caption ranked within k, summed, over min(captions, k)."""
    slots = torch.arange(rank.shape[1], device=rank.device)
    out = []
    for k in map_at:
        inside = (rank > 0) & (rank <= k)
        precision = torch.where(inside, (slots + 1) / rank.clamp(min=1).double(), 0.0)
        out.append(precision.sum(1) / n_pos.clamp(max=k))  # 0 / 0 = nan for an item without captions
    return torch.stack(out, dim=1).cpu()


def _result(t2i, i2t, ap, text_item, *, ks, item="i", map_at=(), ap_at=None) -> RetrievalResult:
    ks = _check_ks(ks)
    _check_item(item)
    metrics = metrics_from_ranks(t2i, i2t, ap, ks=ks, item=item, map_at=map_at, i2t_ap_at=ap_at)
    return RetrievalResult(metrics, t2i, i2t, ap, text_item.cpu(), ks, item=item, map_at=tuple(map_at),
                           i2t_ap_at=ap_at)


# --- weighted statistics: one code path for point estimates and bootstrap replicates -----------


def directions(item: str = "i") -> tuple[str, str]:
    """The two directions' names for items called `item`: ("t2i", "i2t"), ("t2a", "a2t")."""
    return f"t2{item}", f"{item}2t"


def _weighted_metrics(t2i_ranks, i2t_ranks, i2t_ap, *, w_text, w_item, ks, item="i", map_at=(),
                      i2t_ap_at=None) -> dict[str, torch.Tensor]:
    """Every metric under B query weightings at once: w_text (B, n_text), w_item (B, n_item)."""
    t2x, x2t = directions(item)
    out = {}
    for prefix, ranks, w in ((t2x, t2i_ranks, w_text), (x2t, i2t_ranks, w_item)):
        wf = w.double()
        total = wf.sum(1)  # (B,)
        for k in ks:
            out[f"{prefix}_r{k}"] = wf @ (ranks <= k).double() / total
        out[f"{prefix}_mrr"] = wf @ (1.0 / ranks.clamp(min=1).double()) / total
        out[f"{prefix}_medr"] = _weighted_lower_median(ranks, w).double()
    out[f"{x2t}_map"] = w_item.double() @ torch.nan_to_num(i2t_ap) / w_item.sum(1).double()
    for j, k in enumerate(map_at):  # DCASE: one right item, AP@k = 1/rank within k
        t2x_ap = torch.where(t2i_ranks <= k, 1.0 / t2i_ranks.clamp(min=1).double(), 0.0)
        out[f"{t2x}_map{k}"] = w_text.double() @ t2x_ap / w_text.sum(1).double()
        out[f"{x2t}_map{k}"] = w_item.double() @ torch.nan_to_num(i2t_ap_at[:, j]) / w_item.sum(1).double()
    out["rsum"] = 100 * sum(out[f"{d}_r{k}"] for d in (t2x, x2t) for k in ks)
    return out


def _weighted_lower_median(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(B,) smallest value whose cumulative weight reaches half of the total, for each row of weights."""
    order = torch.argsort(values, stable=True)
    cum = weights[:, order].cumsum(1)  # (B, n) integer, so the comparison with half is exact
    first = torch.searchsorted(2 * cum, cum[:, -1:].contiguous())  # first position with 2*cum >= total
    return values[order][first.squeeze(1)]


def _replicates(results: list[RetrievalResult], n_boot: int, seed: int, unit: str) -> list[dict[str, torch.Tensor]]:
    """Each result's metrics on the same `n_boot` resamples of the queries: name -> (n_boot,)."""
    if n_boot < 2:
        raise MmretError(f"the bootstrap needs at least 2 resamples (1000 is usual), got {n_boot}")
    if unit not in UNITS:
        raise MmretError(f"bootstrap unit must be one of {', '.join(UNITS)}, got {unit!r}")
    first = results[0]
    gen = torch.Generator().manual_seed(seed)
    item_pool = (first.i2t_ranks > 0).nonzero().squeeze(1)  # items that are queries
    parts: list[dict[str, list]] = [{} for _ in results]
    for done in range(0, n_boot, _BOOT_BATCH):
        batch = min(_BOOT_BATCH, n_boot - done)
        w_item = _draw_counts(item_pool, batch, len(first.i2t_ranks), gen)
        if unit == "item":
            w_text = w_item[:, first.text_item]  # each drawn item brings all of its captions
        else:
            w_text = _draw_counts(torch.arange(len(first.text_item)), batch, len(first.text_item), gen)
        for r, acc in zip(results, parts):
            stats = _weighted_metrics(r.t2i_ranks, r.i2t_ranks, r.i2t_ap, w_text=w_text, w_item=w_item, ks=r.ks,
                                      item=r.item, map_at=r.map_at, i2t_ap_at=r.i2t_ap_at)
            for name, values in stats.items():
                acc.setdefault(name, []).append(values)
    return [{name: torch.cat(v) for name, v in acc.items()} for acc in parts]


def _draw_counts(pool: torch.Tensor, batch: int, size: int, gen: torch.Generator) -> torch.Tensor:
    """(batch, size) how often each index was drawn in len(pool) draws with replacement from pool."""
    draws = pool[torch.randint(len(pool), (batch, len(pool)), generator=gen)]
    return torch.zeros(batch, size, dtype=torch.int64).scatter_add_(1, draws, torch.ones_like(draws))


def _percentile_interval(values: torch.Tensor, level: float) -> tuple[float, float]:
    if not 0 < level < 1:
        raise MmretError(f"confidence level must be between 0 and 1 (0.95 is usual), got {level}")
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
    low, high = torch.quantile(values.double(), q).tolist()
    return low, high


# --- input checks ------------------------------------------------------------------------------


def _check_embeddings(item_emb: torch.Tensor, text_emb: torch.Tensor) -> tuple[int, int]:
    for name, x in (("item", item_emb), ("text", text_emb)):
        if x.ndim != 2 or len(x) == 0:
            raise MmretError(f"{name} embeddings must be a non-empty (n, dim) matrix, got shape {tuple(x.shape)}")
        if not torch.isfinite(x).all():
            raise MmretError(f"{name} embeddings hold NaN or inf values; the run may have diverged, "
                             "recompute them from a good checkpoint")
    if item_emb.shape[1] != text_emb.shape[1]:
        raise MmretError(f"item embeddings have {item_emb.shape[1]} dims but text embeddings have "
                         f"{text_emb.shape[1]}; both must come from the same run")
    return len(item_emb), len(text_emb)


def _check_text_item(text_item: torch.Tensor, n_text: int, n_item: int) -> torch.Tensor:
    text_item = torch.as_tensor(text_item)
    if text_item.ndim != 1 or len(text_item) != n_text or text_item.is_floating_point():
        raise MmretError(f"text_item must hold one integer item index per caption ({n_text}), "
                         f"got {text_item.dtype} of shape {tuple(text_item.shape)}")
    if n_text and (int(text_item.min()) < 0 or int(text_item.max()) >= n_item):
        raise MmretError(f"text_item points outside the {n_item} items; captions and items "
                         "must come from the same dataset split")
    return text_item.long()


def _check_item(item: str) -> None:
    if not (isinstance(item, str) and item.isalpha() and item.islower() and 0 < len(item) <= 8):
        raise MmretError(f"the items' name in metric names must be a few lower-case letters (i, a), got {item!r}")


def _check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    ks = tuple(sorted(set(int(k) for k in ks)))
    if not ks or ks[0] < 1:
        raise MmretError(f"recall cut-offs k must be positive integers, got {ks}")
    return ks
