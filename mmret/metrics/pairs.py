"""Retrieval between two sets of items that are paired (a sound and the picture of the same
thing): each query has one or more right items among the candidates (pure numpy).

A query's rank is that of its best-ranked right candidate, counted pessimistically as the rest
of mmret counts (a wrong candidate scoring the same as the right one ranks above it). Queries
without a right candidate are left out. Chance is what a random ranking gives: Recall@k = 1 -
C(N - m, k) / C(N, k) and the expected reciprocal rank of the first of m right among N.
"""

from __future__ import annotations

import numpy as np

KS = (1, 5, 10)


def pair_ranks(scores: np.ndarray, right: np.ndarray) -> np.ndarray:
    """(Q,) the 1-based rank of each query's best right candidate; `scores` and `right` are (Q, N)
    (similarities; True where a candidate is right). Every row must have a right candidate."""
    best = np.where(right, scores, -np.inf).max(axis=1, keepdims=True)
    return 1 + ((scores >= best) & ~right).sum(axis=1)


def rank_metrics(ranks: np.ndarray, ks: tuple[int, ...] = KS) -> dict[str, float]:
    """R@k for each k, MRR and the median rank of a set of query ranks."""
    ranks = np.asarray(ranks, dtype=np.float64)
    out = {f"r{k}": float((ranks <= k).mean()) for k in ks}
    out["mrr"] = float((1.0 / ranks).mean())
    out["medr"] = float(np.median(ranks))
    return out


def chance_metrics(n: int, rights: np.ndarray, ks: tuple[int, ...] = KS) -> dict[str, float]:
    """The metrics a random ranking of `n` candidates scores in expectation, for queries with
    `rights[q]` right candidates each."""
    rights = np.asarray(rights, dtype=np.int64)
    r = np.arange(1, n + 1)

    def p_first_after(m: int) -> np.ndarray:  # P(the first right one ranks after r), r = 1..n
        p, out = 1.0, np.empty(n)
        for i in range(n):
            p *= max(n - i - m, 0) / (n - i)
            out[i] = p
        return out

    out = {f"r{k}": 0.0 for k in ks}
    out["mrr"] = 0.0
    for m in np.unique(rights):
        after = p_first_after(int(m))
        share = float((rights == m).mean())
        for k in ks:
            out[f"r{k}"] += share * (1.0 - after[min(k, n) - 1])
        at = np.concatenate([[1.0], after[:-1]]) - after  # P(first right at rank r)
        out["mrr"] += share * float((at / r).sum())
    return out


def bootstrap_intervals(ranks: np.ndarray, n_boot: int, seed: int = 0, ks: tuple[int, ...] = KS,
                        level: float = 0.95) -> dict[str, tuple[float, float]]:
    """Percentile intervals of `rank_metrics` over queries resampled with replacement."""
    rng = np.random.default_rng(seed)
    ranks = np.asarray(ranks)
    draws = [rank_metrics(ranks[rng.integers(0, len(ranks), len(ranks))], ks) for _ in range(n_boot)]
    tail = (1 - level) / 2
    values = {key: [d[key] for d in draws] for key in draws[0]}
    return {key: (float(np.quantile(v, tail)), float(np.quantile(v, 1 - tail))) for key, v in values.items()}
