"""Retrieval metrics: hand-computed cases, a brute-force reference, CLIP_benchmark's recall, chunking,
and the bootstrap helpers."""

from __future__ import annotations

import math

import pytest
import torch

from mmret.errors import MmretError
from mmret.metrics.retrieval import (
    _weighted_metrics,
    bootstrap_ci,
    metrics_from_ranks,
    metrics_from_scores,
    paired_bootstrap,
    retrieval_metrics,
)


def _from_scores_both_ways(scores, text_item, ks):
    """Metrics from a score matrix, and from embeddings whose dot products are exactly that matrix."""
    scores = torch.tensor(scores, dtype=torch.float32)
    text_item = torch.tensor(text_item)
    by_matrix = metrics_from_scores(scores, text_item, ks=ks)
    # text rows = score rows, images = unit vectors: text @ image.T reproduces the matrix exactly
    by_emb = retrieval_metrics(torch.eye(scores.shape[1]), scores, text_item, ks=ks)
    for name in by_matrix.metrics:
        assert by_matrix.metrics[name] == pytest.approx(by_emb.metrics[name], abs=1e-12), name
    assert torch.equal(by_matrix.t2i_ranks, by_emb.t2i_ranks)
    assert torch.equal(by_matrix.i2t_ranks, by_emb.i2t_ranks)
    return by_matrix


def test_hand_computed_several_captions_per_image():
    # rows: captions, columns: images; captions 0,1 -> image 0, caption 2 -> image 1, captions 3,4 -> image 2
    scores = [
        [0.9, 0.1, 0.2],
        [0.3, 0.5, 0.3],  # its image ties with image 2: the tie counts against it (rank 3)
        [0.2, 0.4, 0.6],
        [0.1, 0.2, 0.7],
        [0.8, 0.6, 0.5],
    ]
    r = _from_scores_both_ways(scores, [0, 0, 1, 2, 2], ks=(1, 5, 10))
    assert r.t2i_ranks.tolist() == [1, 3, 2, 1, 3]
    # image 0 ranks captions 0.9(own) 0.8 0.3(own): best rank 1, AP (1/1 + 2/3) / 2
    assert r.i2t_ranks.tolist() == [1, 3, 1]
    assert r.i2t_ap.tolist() == pytest.approx([(1 + 2 / 3) / 2, 1 / 3, (1 + 2 / 3) / 2])
    m = r.metrics
    assert m["t2i_r1"] == pytest.approx(2 / 5) and m["t2i_r5"] == 1 and m["t2i_r10"] == 1
    assert m["t2i_mrr"] == pytest.approx((1 + 1 / 3 + 1 / 2 + 1 + 1 / 3) / 5)
    assert m["t2i_medr"] == 2
    assert m["i2t_r1"] == pytest.approx(2 / 3) and m["i2t_r5"] == 1
    assert m["i2t_mrr"] == pytest.approx((1 + 1 / 3 + 1) / 3)
    assert m["i2t_medr"] == 1
    assert m["i2t_map"] == pytest.approx(((1 + 2 / 3) / 2 * 2 + 1 / 3) / 3)
    assert m["rsum"] == pytest.approx(100 * (2 / 5 + 1 + 1 + 2 / 3 + 1 + 1))


def test_hand_computed_all_captions_missed_ties_and_images_without_captions():
    # captions 0,1 -> image 0, captions 2,3 -> image 1; images 2 and 3 have no captions (distractors)
    scores = [
        [0.5, 0.5, 0.1, 0.9],  # tie with image 1 and image 3 above: rank 3
        [0.2, 0.1, 0.0, 0.3],
        [0.4, 0.1, 0.3, 0.2],  # every other image above: rank 4
        [0.6, 0.0, 0.5, 0.7],
    ]
    r = _from_scores_both_ways(scores, [0, 0, 1, 1], ks=(1, 2, 3))
    assert r.t2i_ranks.tolist() == [3, 2, 4, 4]
    # image 1 ranks 0.5(neg) 0.1(neg, tied with its own 0.1: counted above) 0.1(own) 0.0(own): all missed at k=2
    assert r.i2t_ranks.tolist() == [2, 3, 0, 0]
    assert r.i2t_ap[:2].tolist() == pytest.approx([(1 / 2 + 2 / 4) / 2, (1 / 3 + 2 / 4) / 2])
    assert math.isnan(r.i2t_ap[2]) and math.isnan(r.i2t_ap[3])
    m = r.metrics
    assert (m["t2i_r1"], m["t2i_r2"], m["t2i_r3"]) == (0, 0.25, 0.5)
    assert m["t2i_mrr"] == pytest.approx((1 / 3 + 1 / 2 + 1 / 4 + 1 / 4) / 4)
    assert m["t2i_medr"] == 3  # lower median of 2, 3, 4, 4
    assert (m["i2t_r1"], m["i2t_r2"], m["i2t_r3"]) == (0, 0.5, 1)  # over the two images with captions
    assert m["i2t_mrr"] == pytest.approx((1 / 2 + 1 / 3) / 2)
    assert m["i2t_medr"] == 2
    assert m["i2t_map"] == pytest.approx(((1 / 2 + 2 / 4) / 2 + (1 / 3 + 2 / 4) / 2) / 2)
    assert m["rsum"] == pytest.approx(225)


def test_constant_scores_rank_every_query_last():
    r = metrics_from_scores(torch.zeros(6, 3), torch.tensor([0, 0, 1, 1, 2, 2]))
    assert r.t2i_ranks.tolist() == [3] * 6  # a collapsed model gets no credit from ties
    assert r.i2t_ranks.tolist() == [5, 5, 5]  # 4 wrong captions tie above each image's first caption


def _brute_force(scores: torch.Tensor, text_item: list[int], ks) -> dict[str, float]:
    """Sort every query's full list with wrong items first among equal scores, read ranks off it."""
    n_text, n_item = scores.shape
    t2i, i2t, aps = [], [], []
    for t in range(n_text):
        order = sorted(range(n_item), key=lambda j: (-float(scores[t, j]), j == text_item[t]))
        t2i.append(order.index(text_item[t]) + 1)
    for i in range(n_item):
        own = {t for t in range(n_text) if text_item[t] == i}
        if not own:
            continue
        order = sorted(range(n_text), key=lambda t: (-float(scores[t, i]), t in own))
        hit_ranks = [pos + 1 for pos, t in enumerate(order) if t in own]
        i2t.append(hit_ranks[0])
        aps.append(sum((n + 1) / rank for n, rank in enumerate(hit_ranks)) / len(hit_ranks))
    out = {}
    for d, ranks in (("t2i", t2i), ("i2t", i2t)):
        for k in ks:
            out[f"{d}_r{k}"] = sum(r <= k for r in ranks) / len(ranks)
        out[f"{d}_mrr"] = sum(1 / r for r in ranks) / len(ranks)
        out[f"{d}_medr"] = sorted(ranks)[(len(ranks) - 1) // 2]
    out["i2t_map"] = sum(aps) / len(aps)
    out["rsum"] = 100 * sum(out[f"{d}_r{k}"] for d in ("t2i", "i2t") for k in ks)
    return out


@pytest.mark.parametrize("seed", range(4))
def test_matches_brute_force_with_ties_and_uneven_captions(seed):
    g = torch.Generator().manual_seed(seed)
    n_item = 9
    counts = torch.randint(0, 5, (n_item,), generator=g)  # 0 to 4 captions per image
    counts[0] = 3  # at least one image with captions
    text_item = torch.repeat_interleave(torch.arange(n_item), counts)
    text_item = text_item[torch.randperm(len(text_item), generator=g)]  # captions in any order
    # scores rounded to tenths: many exact ties between right and wrong items
    scores = (torch.rand(len(text_item), n_item, generator=g) * 10).round() / 10
    ks = (1, 2, 5)
    got = metrics_from_scores(scores, text_item, ks=ks, chunk=2).metrics
    want = _brute_force(scores, text_item.tolist(), ks)
    assert got.keys() == want.keys()
    for name in want:
        assert got[name] == pytest.approx(want[name], abs=1e-12), name


# CLIP_benchmark's recall (clip_benchmark/metrics/zeroshot_retrieval.py), rewritten here as the reference:
# per query the fraction of its positives among torch.topk's k best, a hit when that fraction is > 0,
# computed over batches of query rows.
def _clip_benchmark_recall_at_k(scores, positive_pairs, k):
    n_query, n_item = scores.shape
    top = torch.topk(scores, k, dim=1).indices  # (n_query, k)
    onehot = torch.nn.functional.one_hot(top, num_classes=n_item)  # (n_query, k, n_item)
    true_positive = (onehot * positive_pairs.view(n_query, 1, n_item)).sum(dim=(1, 2))
    return true_positive / positive_pairs.sum(dim=1)


def _clip_benchmark_batchify(func, x, y, batch_size, **kwargs):
    return torch.cat([func(x[s:s + batch_size], y[s:s + batch_size], **kwargs)
                      for s in range(0, len(x), batch_size)])


def test_recalls_agree_with_clip_benchmark():
    g = torch.Generator().manual_seed(0)
    n_item, per_item, dim = 40, 5, 16
    item_emb = torch.nn.functional.normalize(torch.randn(n_item, dim, generator=g), dim=1)
    text_item = torch.arange(n_item).repeat_interleave(per_item)
    text_emb = torch.nn.functional.normalize(item_emb[text_item] + 0.9 * torch.randn(len(text_item), dim, generator=g),
                                             dim=1)
    ours = retrieval_metrics(item_emb, text_emb, text_item).metrics
    scores = text_emb @ item_emb.T
    positive = torch.zeros_like(scores, dtype=torch.bool)
    positive[torch.arange(len(scores)), text_item] = True
    for k in (1, 5, 10):
        t2i = (_clip_benchmark_batchify(_clip_benchmark_recall_at_k, scores, positive, 7, k=k)
               > 0).float().mean().item()
        i2t = (_clip_benchmark_batchify(_clip_benchmark_recall_at_k, scores.T, positive.T, 7, k=k)
               > 0).float().mean().item()
        assert ours[f"t2i_r{k}"] == pytest.approx(t2i, abs=1e-6)  # their image_retrieval_recall@k
        assert ours[f"i2t_r{k}"] == pytest.approx(i2t, abs=1e-6)  # their text_retrieval_recall@k
    assert 0 < ours["t2i_r1"] < ours["t2i_r10"] < 1  # a case where the recalls are informative


def test_chunked_and_unchunked_identical():
    g = torch.Generator().manual_seed(1)
    # quarter-integer embeddings: every dot product is exact in float32 whatever the block size, with ties
    item_emb = torch.randint(-4, 5, (23, 8), generator=g).float() / 4
    text_item = torch.randint(0, 23, (61,), generator=g)
    text_emb = torch.randint(-4, 5, (61, 8), generator=g).float() / 4
    whole = retrieval_metrics(item_emb.half(), text_emb.half(), text_item, chunk=10_000)
    for chunk in (1, 3, 16, None):
        part = retrieval_metrics(item_emb.half(), text_emb.half(), text_item, chunk=chunk)
        assert torch.equal(part.t2i_ranks, whole.t2i_ranks)
        assert torch.equal(part.i2t_ranks, whole.i2t_ranks)
        assert torch.equal(part.i2t_ap.nan_to_num(-1), whole.i2t_ap.nan_to_num(-1))
        assert part.metrics == whole.metrics


def test_weighted_metrics_equal_metrics_of_the_repeated_queries():
    g = torch.Generator().manual_seed(2)
    t2i = torch.randint(1, 30, (50,), generator=g)
    i2t = torch.randint(0, 30, (12,), generator=g)  # some rank-0 images (no captions)
    ap = torch.where(i2t > 0, torch.rand(12, generator=g, dtype=torch.float64), float("nan"))
    w_text = torch.randint(0, 4, (3, 50), generator=g)
    w_item = torch.randint(0, 4, (3, 12), generator=g) * (i2t > 0)
    stats = _weighted_metrics(t2i, i2t, ap, w_text=w_text, w_item=w_item, ks=(1, 5, 10))
    for b in range(3):
        want = metrics_from_ranks(t2i.repeat_interleave(w_text[b]), i2t.repeat_interleave(w_item[b]),
                                  ap.repeat_interleave(w_item[b]))
        for name, value in want.items():
            assert stats[name][b].item() == pytest.approx(value, abs=1e-12), name


def _result_with_hits(hit: torch.Tensor, per_item: int = 1):
    """A result whose captions rank their image first where `hit` is true and last elsewhere."""
    n_text = len(hit)
    text_item = torch.arange(n_text // per_item).repeat_interleave(per_item)
    scores = torch.zeros(n_text, n_text // per_item)
    scores[torch.arange(n_text), text_item] = torch.where(hit, 1.0, -1.0)
    return metrics_from_scores(scores, text_item)


def test_bootstrap_ci_is_seeded_and_matches_the_binomial_spread():
    g = torch.Generator().manual_seed(3)
    hit = torch.rand(2000, generator=g) < 0.3
    r = _result_with_hits(hit)
    ci = bootstrap_ci(r, n_boot=1000, seed=7, unit="query")
    assert ci == bootstrap_ci(r, n_boot=1000, seed=7, unit="query")
    assert ci != bootstrap_ci(r, n_boot=1000, seed=8, unit="query")
    p, n = r.metrics["t2i_r1"], len(hit)
    half = 1.96 * math.sqrt(p * (1 - p) / n)  # normal approximation of a proportion's 95% interval
    low, high = ci["t2i_r1"]
    assert low < p < high
    assert (high - low) / 2 == pytest.approx(half, rel=0.15)


def test_bootstrap_by_item_is_wider_when_captions_of_an_item_agree():
    g = torch.Generator().manual_seed(4)
    hit = (torch.rand(300, generator=g) < 0.5).repeat_interleave(5)  # five captions, one fate per image
    r = _result_with_hits(hit, per_item=5)
    by_query = bootstrap_ci(r, n_boot=500, seed=0, unit="query")["t2i_r1"]
    by_item = bootstrap_ci(r, n_boot=500, seed=0, unit="item")["t2i_r1"]
    width = lambda ci: ci[1] - ci[0]  # noqa: E731
    assert width(by_item) > 1.8 * width(by_query)  # sqrt(5) in theory


def test_paired_bootstrap():
    g = torch.Generator().manual_seed(5)
    hit_a = torch.rand(1000, generator=g) < 0.4
    better = hit_a | (torch.rand(1000, generator=g) < 0.1)  # a's hits plus about 6% more
    a, b = _result_with_hits(hit_a), _result_with_hits(better)
    same = paired_bootstrap(a, a, n_boot=200, seed=0)["t2i_r1"]
    assert (same.delta, same.low, same.high, same.p_value, same.significant) == (0, 0, 0, 1, False)
    diff = paired_bootstrap(a, b, n_boot=200, seed=0)
    assert diff["t2i_r1"].delta == pytest.approx(b.metrics["t2i_r1"] - a.metrics["t2i_r1"])
    assert diff["t2i_r1"].significant and diff["t2i_r1"].low > 0
    assert diff["t2i_r1"].p_value == pytest.approx(2 / 201)  # no resample reverses the sign
    # a 1-query difference out of 1000 is noise
    nearly = hit_a.clone()
    nearly[(~hit_a).nonzero()[0]] = True
    small = paired_bootstrap(a, _result_with_hits(nearly), n_boot=200, seed=0)["t2i_r1"]
    assert not small.significant and small.p_value > 0.05
    other = _result_with_hits(hit_a[:500])
    with pytest.raises(MmretError, match="same queries"):
        paired_bootstrap(a, other)


def test_bad_inputs_end_in_clear_errors():
    img, txt, ti = torch.randn(4, 8), torch.randn(6, 8), torch.tensor([0, 0, 1, 1, 2, 3])
    bad = txt.clone()
    bad[2, 3] = float("nan")
    with pytest.raises(MmretError, match="text embeddings hold NaN"):
        retrieval_metrics(img, bad, ti)
    with pytest.raises(MmretError, match="8 dims but text embeddings have 4"):
        retrieval_metrics(img, txt[:, :4], ti)
    with pytest.raises(MmretError, match="outside the 4 items"):
        retrieval_metrics(img, txt, torch.tensor([0, 0, 1, 1, 2, 4]))
    with pytest.raises(MmretError, match="one integer item index per caption"):
        retrieval_metrics(img, txt, ti[:5])
    with pytest.raises(MmretError, match="positive integers"):
        retrieval_metrics(img, txt, ti, ks=(0, 5))
    with pytest.raises(MmretError, match="at least 2 resamples"):
        bootstrap_ci(retrieval_metrics(img, txt, ti), n_boot=1)


# --- captions shared by pictures ---------------------------------------------------------------


def test_same_text_metrics_by_hand():
    from mmret.metrics.retrieval import same_text_metrics

    # three pictures; captions 0 and 1 are the same text ("a flower") under pictures 0 and 1
    scores = torch.tensor([[0.9, 0.8, 0.1],   # caption 0 (of picture 0): picture 0 first
                           [0.9, 0.8, 0.1],   # caption 1 (of picture 1, the same text): picture 0 first
                           [0.1, 0.7, 0.6]])  # caption 2 (of picture 2): picture 1 first, then 2
    text_item, key = torch.tensor([0, 1, 2]), torch.tensor([5, 5, 7])
    usual = retrieval_metrics(torch.eye(3), scores, text_item).metrics
    same = same_text_metrics(torch.eye(3), scores, text_item, key)
    assert usual["t2i_r1"] == pytest.approx(1 / 3)  # caption 1 cannot find its own picture first
    assert same["t2i_r1"] == pytest.approx(2 / 3)  # picture 0 is a right answer for caption 1 too
    assert same["t2i_r5"] == 1.0 and same["t2i_mrr"] == pytest.approx((1 + 1 + 0.5) / 3)
    # image→text: pictures 0 and 1 score their own caption and the other's (the same text) alike;
    # the usual protocol counts that tie against them, here both captions are right
    assert usual["i2t_r1"] == pytest.approx(1 / 3)
    assert same["i2t_r1"] == 1.0
    # without shared texts both agree
    plain = same_text_metrics(torch.eye(3), scores, text_item, torch.tensor([1, 2, 3]))
    for name, value in plain.items():
        assert value == pytest.approx(usual[name]), name
