"""Exact inner-product top-k over an (n, dim) float16 gallery, typically memory-mapped.

Exact search screens the gallery in low precision, keeps the best `k + slack` candidates,
rescores them exactly and *proves* the result exact: every row left out scored at most `a_min`
in the screen, so its true score is at most `a_min + E`, where E bounds the screen's rounding
error (from the query norm, the largest gallery norm and the unit roundoffs). When the k-th
rescored candidate beats that, the top k is exact; a query that cannot be proven (masses of
near-duplicates) is screened again alone, keeping every row the bound cannot rule out. The
screen is what makes a CPU fast:
one query is a float16 matrix-vector product that streams the gallery once; a batch is a
bfloat16 matrix product (avx512_bf16 through oneDNN), about twice as fast as float32 and far
faster than float16 products, for which CPUs without avx512_fp16 have no instructions. Of each
block of scores, only groups of rows whose maximum can still enter a query's candidates are
merged: a max over groups costs a fraction of a top-k over every score.
`benchmarks/search.py` measures all of this.

Exact scores are float32 dot products of the query with the float16 gallery rows (converted
exactly), summed in the same order for every row so that identical rows tie; equal scores go to
the smaller row. Normalised embeddings give cosine similarity.
"""

from __future__ import annotations

import functools
import logging
import math
import warnings
from typing import Any

import numpy as np
import torch

from mmret.errors import MmretError

_logger = logging.getLogger(__name__)

_SLACK = 54  # candidates the screen keeps beyond k, so that rounding rarely forces a rescan
# up to this many queries, one float16 matrix-vector product each is fastest: the bfloat16 screen
# converts the whole gallery once per batch, which costs about as much as 8-9 products. Measured on
# the 100K x 512 gallery of benchmarks/serve.py (2 shared cores, load 12): 4 queries 388 ms batched
# against 188 ms one by one, 8: 444 / 418, 16: 433 / 795. A server batching a few concurrent text
# queries sits right in that range; it was 2.
_FP16_MAX_QUERIES = 8
_QUERY_BLOCK = 1024  # queries screened together: bounds the (queries, rows) score block
_ROWS_PER_CHUNK = 16384  # gallery rows converted and multiplied at once (16 MB of bfloat16 at 512-d)
_GROUP = 32  # the bfloat16 screen skips groups of this many rows that cannot enter the top
_U32, _U16, _UBF16 = 2.0**-24, 2.0**-11, 2.0**-9  # unit roundoffs of float32, float16, bfloat16


class ExactIndex:
    """Exact inner-product top-k over an (n, dim) float16 matrix, typically memory-mapped."""

    kind = "exact"

    def __init__(self, vectors: np.ndarray, max_norm: float | None = None, info: dict | None = None):
        self.vectors = _check_gallery(vectors)
        with warnings.catch_warnings():  # a read-only memory map is fine: search never writes to it
            warnings.simplefilter("ignore", UserWarning)
            self.gallery = torch.from_numpy(vectors)  # (N, D) float16, shares the memory map
        self.max_norm = _max_row_norm(self.gallery) if max_norm is None else float(max_norm)
        self.info = dict(info or {}, kind="exact", n=len(vectors), dim=vectors.shape[1])

    @property
    def n(self) -> int:
        return self.gallery.shape[0]

    @property
    def dim(self) -> int:
        return self.gallery.shape[1]

    def search(self, queries: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids), both (n_queries, k): float32 exact scores, best first, and int64 rows."""
        q = _check_queries(queries, self.dim)
        k = _check_k(k, self.n)
        scores = np.empty((len(q), k), dtype=np.float32)
        ids = np.empty((len(q), k), dtype=np.int64)
        for start in range(0, len(q), _QUERY_BLOCK):
            block = q[start:start + _QUERY_BLOCK]
            s, i = self._search_block(block, k)
            scores[start:start + len(block)], ids[start:start + len(block)] = s.numpy(), i.numpy()
        return scores, ids

    def _search_block(self, q: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        precision = self._screen_precision(q)
        if precision in ("fp32", "fp16-scan"):
            return self._scan(q, k)
        n_cand = min(self.n, k + _SLACK)
        screen = _screen_fp16 if precision == "fp16" else _screen_bf16
        approx, cand = screen(q, self.gallery, n_cand)  # (B, C) screen scores and their rows
        scores, ids = _top_k_by_score_then_row(_exact_scores(q, self.gallery, cand), cand, k)
        if n_cand < self.n:  # otherwise every row was rescored: exact already
            bound = _screen_error_bound(q, self.max_norm, precision)  # (B,)
            unproven = scores[:, -1] <= approx.min(1).values + bound  # rows left out score <= that
            if unproven.any():
                rows = unproven.nonzero().squeeze(1)
                _logger.debug("%d of %d queries rescanned", len(rows), len(q))
                scores[rows], ids[rows] = self._scan(q[rows], k)
        return scores, ids

    def _scan(self, q: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One query at a time: screen every row, rescore every row the bound cannot rule out.

        With E = bound, a row screened below (k-th screen score - 2E) scores below the k-th exact
        score, so the top k (ties included) is among the rest, however many tie."""
        out = torch.empty(len(q), k), torch.empty(len(q), k, dtype=torch.int64)
        for b in range(len(q)):
            row = q[b:b + 1]
            precision = "fp16" if self._screen_precision(row) == "fp16" else "fp32"
            approx = _screen_all(row, self.gallery, precision)  # (N,)
            floor = approx.topk(k).values[-1] - 2 * _screen_error_bound(row, self.max_norm, precision)
            cand = (approx >= floor).nonzero().T  # (1, C)
            out[0][b], out[1][b] = _top_k_by_score_then_row(_exact_scores(row, self.gallery, cand), cand, k)
        return out

    def _screen_precision(self, q: torch.Tensor) -> str:
        """fp16 for one or two queries, bf16 for more; a one-by-one scan (fp16, else fp32) on a
        machine whose kernels fail their check."""
        no_overflow = float(q.norm(dim=1).max()) * self.max_norm < 3e4
        fp16 = no_overflow and _screen_within_bound("fp16")
        if len(q) <= _FP16_MAX_QUERIES and fp16:
            return "fp16"
        if _screen_within_bound("bf16"):
            return "bf16"
        return "fp16-scan" if fp16 else "fp32"


def _check_queries(queries: Any, dim: int) -> torch.Tensor:
    q = queries if isinstance(queries, torch.Tensor) else torch.from_numpy(np.asarray(queries))
    q = q.detach().to("cpu", torch.float32)
    if q.ndim == 1:
        q = q[None]
    if q.ndim != 2 or q.shape[1] != dim:
        raise MmretError(f"queries must have {dim} dims like the gallery, got shape {tuple(q.shape)}; "
                         "embed them with the model that built the index")
    if not torch.isfinite(q).all():
        raise MmretError("queries hold NaN or inf values; check the model that embedded them")
    return q.contiguous()


def _check_k(k: int, n: int) -> int:
    if k < 1:
        raise MmretError(f"k must be at least 1, got {k}")
    return min(int(k), n)


def _check_gallery(array: np.ndarray) -> np.ndarray:
    if array.ndim != 2 or array.dtype != np.float16 or len(array) == 0:
        raise MmretError(f"index vectors must be a non-empty (n, dim) float16 matrix, got {array.dtype} "
                         f"of shape {array.shape}")
    return array


def _max_row_norm(gallery: torch.Tensor) -> float:
    norms = [gallery[s:s + _ROWS_PER_CHUNK].float().norm(dim=1).max()
             for s in range(0, len(gallery), _ROWS_PER_CHUNK)]
    largest = float(torch.stack(norms).max())
    if not math.isfinite(largest):
        raise MmretError("the gallery embeddings hold NaN or inf values; recompute them from a good checkpoint")
    return largest


def _screen_fp16(q: torch.Tensor, gallery: torch.Tensor, n_cand: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top candidates by float16 matrix-vector products (float32 accumulation, float16 result):
    each query reads every gallery byte once, at memory bandwidth."""
    tops = [torch.mv(gallery, row.half()).topk(n_cand) for row in q]  # each (N,) -> (C,)
    return torch.stack([t.values for t in tops]).float(), torch.stack([t.indices for t in tops])


def _screen_bf16(q: torch.Tensor, gallery: torch.Tensor, n_cand: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top candidates by bfloat16 matrix products over gallery chunks, merged as they come."""
    qb = q.bfloat16()
    as32 = torch.empty(_ROWS_PER_CHUNK, gallery.shape[1])
    asbf = torch.empty(_ROWS_PER_CHUNK, gallery.shape[1], dtype=torch.bfloat16)
    bits = torch.empty(len(q) * _ROWS_PER_CHUNK, dtype=torch.int32)
    best = None
    for start in range(0, len(gallery), _ROWS_PER_CHUNK):
        chunk = gallery[start:start + _ROWS_PER_CHUNK]
        # float16 -> float32 -> bfloat16 in reused buffers: 5x faster than torch's direct conversion
        cbf = asbf[:len(chunk)].copy_(as32[:len(chunk)].copy_(chunk))
        scores = _bf16_to_f32(qb @ cbf.T, bits)  # (B, c)
        if best is None:
            top = scores.topk(min(n_cand, len(chunk)), dim=1)
            best = top.values, top.indices + start
        elif best[0].shape[1] < n_cand:  # k beyond one chunk: not full yet, nothing to skip
            best = _merge_top(*best, scores, torch.arange(start, start + len(chunk)).expand(len(q), -1), n_cand)
        else:
            best = _merge_better(*best, scores, start)
    return best


def _bf16_to_f32(x: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """bfloat16 is the top half of a float32: widening by a shift is 5x faster than `.float()`."""
    out = bits[:x.numel()].view(x.shape).copy_(x.view(torch.int16))  # the sign extension is shifted out
    return out.bitwise_left_shift_(16).view(torch.float32)


def _merge_better(best_v, best_i, scores, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    b, c = scores.shape
    main = c - c % _GROUP
    best_v, best_i = _merge_better_groups(best_v, best_i, scores[:, :main], offset)
    if main < c:  # the last chunk's ungrouped tail is merged whole
        tail = torch.arange(offset + main, offset + c).expand(b, -1)
        best_v, best_i = _merge_top(best_v, best_i, scores[:, main:], tail, best_v.shape[1])
    return best_v, best_i


def _merge_better_groups(best_v, best_i, scores, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge into each row's candidates only the groups of _GROUP columns holding a score above the
    row's current worst candidate: a max over groups costs a fraction of a top-k over every score,
    and after the first chunks few groups qualify."""
    b, c = scores.shape
    worst = best_v.min(1, keepdim=True).values  # (B, 1)
    group_max = scores.reshape(b, c // _GROUP, _GROUP).amax(2)  # (B, G)
    rows, groups = (group_max > worst).nonzero(as_tuple=True)  # row-major, so rows ascend
    if len(rows) == 0:
        return best_v, best_i
    cols = groups[:, None] * _GROUP + torch.arange(_GROUP)  # (m, _GROUP) columns of each group
    counts = torch.bincount(rows, minlength=b)
    slot = torch.arange(len(rows)) - (torch.cumsum(counts, 0) - counts)[rows]  # rank of a group in its row
    place = slot[:, None] * _GROUP + torch.arange(_GROUP)  # (m, _GROUP) places in the row's padded list
    pad_v = torch.full((b, int(counts.max()) * _GROUP), float("-inf"))
    pad_i = torch.zeros(pad_v.shape, dtype=torch.int64)
    pad_v[rows[:, None], place] = scores[rows[:, None], cols]
    pad_i[rows[:, None], place] = cols + offset
    touched = (counts > 0).nonzero().squeeze(1)
    v, i = _merge_top(best_v[touched], best_i[touched], pad_v[touched], pad_i[touched], best_v.shape[1])
    best_v[touched], best_i[touched] = v, i
    return best_v, best_i


def _merge_top(v1, i1, v2, i2, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    v, i = torch.cat([v1, v2], 1), torch.cat([i1, i2], 1)
    top = v.topk(min(n, v.shape[1]), dim=1)
    return top.values, i.gather(1, top.indices)


def _screen_error_bound(q: torch.Tensor, max_norm: float, precision: str) -> torch.Tensor:
    """(B,) bound on |screen score - exact score| over every gallery row.

    The screen rounds the query (u_q) and the gallery (u_g), multiplies exactly, adds D products
    in float32 (gamma_D) and rounds the result (u_out); the exact scores carry float32 summation
    error too (gamma_D). Each error is relative to sum |q_i g_i| <= |q| max|g| (Cauchy-Schwarz);
    `tiny` covers values below the format's normal range (float16 subnormals), and 10% the
    float32 norms themselves.
    """
    u_q, u_g, u_out, tiny = {"fp16": (_U16, 0.0, _U16, 2.0**-25), "bf16": (_UBF16, _UBF16, _UBF16, 2.0**-126),
                             "fp32": (0.0, 0.0, 0.0, 2.0**-126)}[precision]
    d = q.shape[1]
    gamma = d * _U32 / (1 - d * _U32)
    relative = (1 + u_q) * (1 + u_g) * (1 + gamma) * (1 + u_out) - 1 + gamma
    absolute = tiny * (1 + math.sqrt(d) * max_norm)
    return 1.1 * (relative * q.norm(dim=1) * max_norm + absolute)


@functools.lru_cache(maxsize=None)
def _screen_within_bound(precision: str) -> bool:
    """Check once per process that this machine's kernel accumulates as the bound assumes (float32),
    on all-positive vectors where any lower-precision accumulation would show at once."""
    gen = torch.Generator().manual_seed(0)
    gallery = torch.nn.functional.normalize(torch.rand(256, 512, generator=gen), dim=1).half()
    q = torch.nn.functional.normalize(torch.rand(3 if precision == "bf16" else 1, 512, generator=gen), dim=1)
    screen = _screen_fp16 if precision == "fp16" else _screen_bf16
    approx, rows = screen(q, gallery, 256)
    exact = (q.double() @ gallery.double().T).gather(1, rows)
    ok = bool(((approx.double() - exact).abs().max(1).values <= _screen_error_bound(q, 1.0, precision)).all())
    if not ok:
        _logger.warning("%s matrix products on this machine exceed their error bound; exact search "
                        "scans without them (slower)", precision)
    return ok


def _exact_scores(q: torch.Tensor, gallery: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """(B, C) float32 dot products of each query with its candidate rows, every one summed in the
    same order so identical rows tie exactly (float32 BLAS does not promise that across columns).
    32 queries at a time keep the gathered rows in cache."""
    out = torch.empty(rows.shape)
    for s in range(0, len(q), 32):
        part = rows[s:s + 32]
        g = torch.index_select(gallery, 0, part.reshape(-1)).float().view(*part.shape, -1)  # (b, C, D)
        out[s:s + 32] = (g * q[s:s + 32, None, :]).sum(-1)
    return out


def _top_k_by_score_then_row(scores, rows, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    by_row = rows.argsort(dim=1)
    scores, rows = scores.gather(1, by_row), rows.gather(1, by_row)
    order = scores.argsort(dim=1, descending=True, stable=True)[:, :k]  # equal scores keep row order
    return scores.gather(1, order), rows.gather(1, order)


def _screen_all(row: torch.Tensor, gallery: torch.Tensor, precision: str) -> torch.Tensor:
    """(N,) screen scores of one query (1, D) against every row, in float16 or float32."""
    if precision == "fp16":
        return torch.mv(gallery, row[0].half()).float()
    return torch.cat([torch.mv(gallery[s:s + _ROWS_PER_CHUNK].float(), row[0])
                      for s in range(0, len(gallery), _ROWS_PER_CHUNK)])
