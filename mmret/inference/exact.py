"""Exact inner-product top-k over an (n, dim) float16 gallery, typically memory-mapped.

Every row is scored by a plain product, one block of queries at a time: for one or two queries a
float16 matrix-vector product straight over the gallery (it streams the gallery as fast as a
memcpy); for more, the gallery in chunks small enough to stay in cache, widened to float32
(exactly) and multiplied with the queries; from `_BF16_MIN_QUERIES` queries on, where the product
is compute-bound, the chunks go to bfloat16 (AMX or avx512_bf16 through oneDNN, several times
faster than float32). A gallery of up to 1 GiB on a CPU with native bfloat16 keeps a bfloat16
copy once a batch of 3 or more queries arrives (a server's small batches), and such batches are
one product over it. Each low-precision kernel is used only on a machine where it passes a
check against its rounding bound E.

The k-th best product score minus 2E is a floor: every row above it is rescored in a fixed order
(each row summed the same way, so identical rows tie exactly) and ranked by score, then by row.
Rows below the floor cannot be in the top k: a row whose rescored score reaches the k-th rescored
score scored at least that minus 2E in the product. So the result is exact, near-duplicates and
all, with no second pass over the gallery. `benchmarks/search.py` measures it.

Normalised embeddings give cosine similarity.
"""

from __future__ import annotations

import functools
import logging
import math
import threading
import warnings
from typing import Any

import numpy as np
import torch

from mmret.common.device import bf16_supported
from mmret.errors import MmretError

_logger = logging.getLogger(__name__)

_ROWS_PER_CHUNK = 512  # gallery rows widened and multiplied at once: 1 MB of float32 at 512-d, in L2
_SCORE_BUDGET = 2**26  # scores held at once (256 MB of float32): bounds the query block at large n
# up to this many queries, one float16 matrix-vector product each is fastest. Serve (#14) had raised
# it to 8 against the earlier bfloat16 screen, which converted the whole gallery once per batch; the
# float32 chunks here cost the same for 1 to 8 queries. 100K x 512, 2 shared cores at load 10, best
# of 7: 3 queries 40 ms on float32 chunks / 114 ms as float16 products, 4: 48 / 176, 8: 29 / 381;
# best of 15: 1 query 20 / 11 ms, 2: 21 / 22 ms. So a server's few queries stay on one pass.
_FP16_MAX_QUERIES = 2
_BF16_MIN_QUERIES = 32  # from this many queries on, the product is compute-bound: bfloat16 pays
# A gallery up to this size keeps a bfloat16 copy once a batch of 3+ queries arrives, on a CPU with
# native bfloat16: the batch is then one product straight over it, no chunk widened. 100K x 512 on a
# 2-core EPYC (avx512_bf16), load 2: 4 queries 18.6 ms against 36 as float16 products and ~50 on
# float32 chunks; a server's small batches are what it is for (the copy is as much memory again).
_BF16_COPY_MAX_BYTES = 2**30
_SPARE = 64  # rows each query's top-k search keeps beyond k; a query whose floor reaches past them
# (masses of near-ties) takes its candidates from its whole row of scores
_U32, _U16, _UBF16 = 2.0**-24, 2.0**-11, 2.0**-9  # unit roundoffs of float32, float16 and bfloat16


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
        self._bf16: torch.Tensor | None = None  # the bfloat16 copy, made by the first batch that wants it
        self._copy_lock = threading.Lock()

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
        allowed = self._copy_allowed()
        precision = _precision(q, self.max_norm, copy=allowed)
        copy = self._bf16_copy() if precision == "bf16" and allowed else None
        scores = np.empty((len(q), k), dtype=np.float32)
        ids = np.empty((len(q), k), dtype=np.int64)
        step = max(1, _SCORE_BUDGET // self.n)
        for start in range(0, len(q), step):
            block = q[start:start + step]
            approx = _product(block, self.gallery, precision, copy)  # (B, N)
            bound = _error_bound(block, self.max_norm, precision)  # (B,)
            s, i = _rescore_top_k(block, self.gallery, approx, bound, k)
            scores[start:start + len(block)], ids[start:start + len(block)] = s.numpy(), i.numpy()
        return scores, ids


    def _copy_allowed(self) -> bool:
        return self.n * self.dim * 2 <= _BF16_COPY_MAX_BYTES and bf16_supported(torch.device("cpu"))

    def _bf16_copy(self) -> torch.Tensor:
        """The gallery in bfloat16 (made once; float16 -> float32 -> bfloat16 by chunks, as the
        chunked product rounds it, so either product gives the same scores)."""
        with self._copy_lock:  # a server's batches come from one thread, but a library user may share it
            if self._bf16 is None:
                copy = torch.empty(self.gallery.shape, dtype=torch.bfloat16)
                for start in range(0, self.n, 65536):
                    copy[start:start + 65536] = self.gallery[start:start + 65536].float()
                self._bf16 = copy
        return self._bf16


def _precision(q: torch.Tensor, max_norm: float, copy: bool = False) -> str:
    """fp16 matrix-vector products for one or two queries (as fast as a memcpy of the gallery;
    float32 products of widened chunks take about 1.7x that), bf16 products for batches (from 3
    queries when the gallery's bfloat16 copy may be kept, else from 32), float32 in between and
    wherever a kernel fails its check."""
    no_overflow = float(q.norm(dim=1).max()) * max_norm < 3e4  # float16 scores stay finite
    if len(q) <= _FP16_MAX_QUERIES and no_overflow and _product_within_bound("fp16"):
        return "fp16"
    if len(q) >= (_FP16_MAX_QUERIES + 1 if copy else _BF16_MIN_QUERIES) and _product_within_bound("bf16"):
        return "bf16"
    return "fp32"


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
    norms = [gallery[s:s + 65536].float().norm(dim=1).max() for s in range(0, len(gallery), 65536)]
    largest = float(torch.stack(norms).max())
    if not math.isfinite(largest):
        raise MmretError("the gallery embeddings hold NaN or inf values; recompute them from a good checkpoint")
    return largest


def _product(q: torch.Tensor, gallery: torch.Tensor, precision: str, copy: torch.Tensor | None = None) -> torch.Tensor:
    """(B, N) scores of every row. fp16: one matrix-vector product per query straight over the
    float16 gallery. bf16 with the gallery's bfloat16 `copy`: one product over it. fp32 / bf16:
    chunk by chunk, float16 rows widened into a buffer that stays in cache (widening the whole
    gallery would double the bytes read, and torch's float16 matrix products are slow on CPUs
    without avx512_fp16)."""
    if precision == "fp16":
        return torch.stack([torch.mv(gallery, row.half()) for row in q])
    if precision == "bf16" and copy is not None:
        return torch.mm(q.to(torch.bfloat16), copy.T)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    out = torch.empty(len(q), len(gallery), dtype=dtype)
    as32 = torch.empty(_ROWS_PER_CHUNK, gallery.shape[1])
    low = as32 if dtype == torch.float32 else torch.empty(as32.shape, dtype=dtype)
    ql = q.to(dtype)
    for start in range(0, len(gallery), _ROWS_PER_CHUNK):
        part = gallery[start:start + _ROWS_PER_CHUNK]
        # float16 -> float32 -> bfloat16 through float32: torch's direct conversion is several times slower
        chunk = low[:len(part)].copy_(as32[:len(part)].copy_(part))
        torch.mm(ql, chunk.T, out=out[:, start:start + len(part)])
    return out


def _rescore_top_k(q: torch.Tensor, gallery: torch.Tensor, approx: torch.Tensor, bound: torch.Tensor,
                   k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rescore every row within 2 * bound of each query's k-th product score; the top k of those,
    by rescored score then row, is the exact top k (see the module docstring)."""
    top = approx.topk(min(k + _SPARE, approx.shape[1]), dim=1)  # (B, k + spare), best first
    floor = top.values[:, k - 1].float() - 2 * bound  # (B,)
    queries, slots = (top.values >= floor[:, None]).nonzero(as_tuple=True)
    rows = top.indices[queries, slots]
    if top.values.shape[1] < approx.shape[1]:
        short = (top.values[:, -1] >= floor).nonzero().flatten()  # near-ties reach past the spare rows:
        if len(short):  # these queries take every row above the floor from their whole row of scores
            extra_q, extra_rows = (approx[short] >= floor[short, None]).nonzero(as_tuple=True)
            keep = ~torch.isin(queries, short)
            queries, rows = torch.cat([queries[keep], short[extra_q]]), torch.cat([rows[keep], extra_rows])
    order = torch.argsort(queries * len(gallery) + rows)  # by query, then row
    queries, rows = queries[order], rows[order]
    counts = torch.bincount(queries, minlength=len(q))
    slot = torch.arange(len(rows)) - (torch.cumsum(counts, 0) - counts)[queries]  # place in its query's list
    scores = torch.full((len(q), int(counts.max())), float("-inf"))
    cand = torch.full(scores.shape, len(gallery), dtype=torch.int64)  # padding sorts after every row
    scores[queries, slot] = _exact_scores(q, gallery, queries, rows)
    cand[queries, slot] = rows
    order = scores.argsort(dim=1, descending=True, stable=True)[:, :k]  # equal scores keep row order
    return scores.gather(1, order), cand.gather(1, order)


def _exact_scores(q: torch.Tensor, gallery: torch.Tensor, queries: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """(P,) float32 dot products of pairs (query, row), each summed in the same order, so identical
    rows tie exactly (a BLAS product does not promise that across columns). 8192 pairs at a time
    keep the gathered rows in cache."""
    out = torch.empty(len(rows))
    for s in range(0, len(rows), 8192):
        g = torch.index_select(gallery, 0, rows[s:s + 8192]).float()  # (p, D)
        out[s:s + 8192] = (g * q[queries[s:s + 8192]]).sum(-1)
    return out


def _error_bound(q: torch.Tensor, max_norm: float, precision: str) -> torch.Tensor:
    """(B,) bound on |product score - rescored score| over every gallery row.

    The product rounds the query (u_q) and the gallery (u_g; float16 -> float32 is exact), adds D
    products in float32 in any order (gamma_D) and rounds the result (u_out); the rescoring carries
    float32 summation error too (gamma_D). Each error is relative to sum |q_i g_i| <= |q| max|g|
    (Cauchy-Schwarz); `tiny` covers values below the format's normal range (float16 subnormals),
    and 10% the float32 norms themselves.
    """
    u_q, u_g, u_out, tiny = {"fp16": (_U16, 0.0, _U16, 2.0**-25), "bf16": (_UBF16, _UBF16, _UBF16, 2.0**-126),
                             "fp32": (0.0, 0.0, 0.0, 2.0**-126)}[precision]
    d = q.shape[1]
    gamma = d * _U32 / (1 - d * _U32)
    relative = (1 + u_q) * (1 + u_g) * (1 + gamma) * (1 + u_out) - 1 + gamma
    absolute = tiny * (1 + math.sqrt(d) * max_norm)
    return 1.1 * (relative * q.norm(dim=1) * max_norm + absolute)


@functools.lru_cache(maxsize=None)
def _product_within_bound(precision: str) -> bool:
    """Check once per process that this machine's product accumulates as the bound assumes (in
    float32), on all-positive vectors where any lower-precision accumulation would show at once."""
    gen = torch.Generator().manual_seed(0)
    gallery = torch.nn.functional.normalize(torch.rand(256, 512, generator=gen), dim=1).half()
    n = {"fp16": 1, "bf16": _BF16_MIN_QUERIES}.get(precision, 3)
    q = torch.nn.functional.normalize(torch.rand(n, 512, generator=gen), dim=1)
    approx = _product(q, gallery, precision).double()
    exact = q.double() @ gallery.double().T
    ok = bool(((approx - exact).abs().max(1).values <= _error_bound(q, 1.0, precision)).all())
    if not ok:
        _logger.warning("%s matrix products on this machine exceed their error bound; exact search "
                        "uses float32 products (slower)", precision)
    return ok
