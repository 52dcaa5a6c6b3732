"""The audio protocol of Clotho and DCASE: metric names t2a / a2t, and recall, MRR and mAP@10
against brute-force references, DCASE's own evaluation loop among them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mmret.metrics.retrieval import bootstrap_ci, metrics_from_scores, paired_bootstrap, retrieval_metrics


def _dcase_t2a(scores: torch.Tensor, text_audio: list[int]) -> dict[str, float]:
    """DCASE 2022 task 6B's `eval_script.py`, rewritten over a score matrix: each caption's ranked list
    of clips, R@1/5/10 as hits in the top k, mAP@10 as the sum over right clips in the top 10 of
    (right clips so far) / position."""
    r1, r5, r10, map10 = [], [], [], []
    for t, right in enumerate(text_audio):
        ranked = sorted(range(scores.shape[1]), key=lambda a: -float(scores[t, a]))
        preds = np.asarray([a == right for a in ranked])
        r1.append(preds[:1].sum())
        r5.append(preds[:5].sum())
        r10.append(preds[:10].sum())
        positions = np.arange(1, 11, dtype=float)[preds[:10] > 0]
        map10.append(np.sum(np.arange(1, len(positions) + 1) / positions) if len(positions) else 0.0)
    return {"t2a_r1": np.mean(r1), "t2a_r5": np.mean(r5), "t2a_r10": np.mean(r10), "t2a_map10": np.mean(map10)}


def _a2t_reference(scores: torch.Tensor, text_audio: list[int], k: int = 10) -> dict[str, float]:
    """Audio→text by brute force: a hit at k when any of the clip's captions is in its top k; AP@k
    over all of its captions divided by min(captions, k); full AP; first-hit MRR."""
    hits = {1: [], 5: [], 10: []}
    ap_k, ap, rr = [], [], []
    for a in range(scores.shape[1]):
        own = {t for t, x in enumerate(text_audio) if x == a}
        if not own:
            continue
        ranked = sorted(range(scores.shape[0]), key=lambda t: -float(scores[t, a]))
        positions = [i + 1 for i, t in enumerate(ranked) if t in own]
        for cut in hits:
            hits[cut].append(positions[0] <= cut)
        ap_k.append(sum((n + 1) / p for n, p in enumerate(positions) if p <= k) / min(len(own), k))
        ap.append(sum((n + 1) / p for n, p in enumerate(positions)) / len(own))
        rr.append(1 / positions[0])
    out = {f"a2t_r{cut}": np.mean(v) for cut, v in hits.items()}
    return {**out, "a2t_map10": np.mean(ap_k), "a2t_map": np.mean(ap), "a2t_mrr": np.mean(rr)}


@pytest.mark.parametrize("seed", range(5))
def test_matches_dcase_and_a_brute_force_reference(seed):
    g = torch.Generator().manual_seed(seed)
    n_audio = 23
    counts = torch.randint(1, 7, (n_audio,), generator=g)  # Clotho has 5 captions a clip; here 1 to 6
    text_audio = torch.repeat_interleave(torch.arange(n_audio), counts)
    text_audio = text_audio[torch.randperm(len(text_audio), generator=g)]
    scores = torch.randn(len(text_audio), n_audio, generator=g, dtype=torch.float64).float()  # no ties
    got = metrics_from_scores(scores, text_audio, item="a", map_at=(10,), chunk=7).metrics
    want = {**_dcase_t2a(scores, text_audio.tolist()), **_a2t_reference(scores, text_audio.tolist())}
    for name, value in want.items():
        assert got[name] == pytest.approx(value, abs=1e-12), name


def test_names_say_audio_and_pictures_keep_theirs():
    g = torch.Generator().manual_seed(0)
    audio, text = torch.nn.functional.normalize(torch.randn(6, 8, generator=g), dim=1), torch.randn(12, 8, generator=g)
    text_audio = torch.arange(12) % 6
    sound = retrieval_metrics(audio, torch.nn.functional.normalize(text, dim=1), text_audio, item="a", map_at=(10,))
    assert set(sound.metrics) == {"t2a_r1", "t2a_r5", "t2a_r10", "a2t_r1", "a2t_r5", "a2t_r10", "t2a_mrr", "a2t_mrr",
                                  "t2a_medr", "a2t_medr", "a2t_map", "t2a_map10", "a2t_map10", "rsum"}
    picture = retrieval_metrics(audio, torch.nn.functional.normalize(text, dim=1), text_audio)
    assert {k.replace("t2i", "t2a").replace("i2t", "a2t") for k in picture.metrics} | {"t2a_map10", "a2t_map10"} \
        == set(sound.metrics)
    assert sound.metrics["t2a_r1"] == picture.metrics["t2i_r1"] and sound.metrics["rsum"] == picture.metrics["rsum"]


def test_map10_on_a_hand_computed_case():
    # 3 clips; captions 0, 1 describe clip 0, caption 2 clip 1, caption 3 clip 2
    scores = torch.tensor([[0.9, 0.1, 0.0],   # caption 0: clip 0 first -> 1
                           [0.2, 0.8, 0.1],   # caption 1: clip 0 second -> 1/2
                           [0.5, 0.4, 0.3],   # caption 2: clip 1 second -> 1/2
                           [0.6, 0.7, 0.5]])  # caption 3: clip 2 third -> 1/3
    m = metrics_from_scores(scores, torch.tensor([0, 0, 1, 2]), item="a", map_at=(1, 10)).metrics
    assert m["t2a_map10"] == pytest.approx((1 + 0.5 + 0.5 + 1 / 3) / 4)
    assert m["t2a_map1"] == pytest.approx(0.25)  # only caption 0 has its clip within 1
    # clip 0 ranks its captions 0 (0.9), 3 (0.6), 2 (0.5), 1 (0.2): right ones at 1 and 4 -> (1 + 2/4) / 2
    # clip 1 ranks 1 (0.8), 3 (0.7), 2 (0.4): right at 3 -> 1/3; clip 2 ranks 3 (0.5) first -> 1
    assert m["a2t_map10"] == pytest.approx(((1 + 0.5) / 2 + 1 / 3 + 1) / 3)
    assert m["a2t_map1"] == pytest.approx((1 / 1 + 0 + 1) / 3)  # AP@1 divides by min(captions, 1) = 1


def test_bootstrap_and_paired_comparison_carry_the_audio_metrics():
    g = torch.Generator().manual_seed(1)
    text_audio = torch.arange(40) % 8
    a = metrics_from_scores(torch.randn(40, 8, generator=g), text_audio, item="a", map_at=(10,))
    b = metrics_from_scores(torch.randn(40, 8, generator=g), text_audio, item="a", map_at=(10,))
    ci = bootstrap_ci(a, n_boot=200, seed=0)
    assert set(ci) == set(a.metrics)
    lo, hi = ci["t2a_map10"]
    assert lo <= a.metrics["t2a_map10"] <= hi
    diff = paired_bootstrap(a, b, n_boot=200, seed=0)
    assert diff["a2t_map10"].delta == pytest.approx(b.metrics["a2t_map10"] - a.metrics["a2t_map10"])
    picture = metrics_from_scores(torch.randn(40, 8, generator=g), text_audio)
    with pytest.raises(Exception, match="not evaluated on the same queries"):
        paired_bootstrap(a, picture, n_boot=100)


def test_same_text_metrics_name_their_items():
    from mmret.metrics.retrieval import same_text_metrics

    g = torch.Generator().manual_seed(0)
    items, texts = torch.randn(4, 8, generator=g), torch.randn(6, 8, generator=g)
    owner, keys = torch.tensor([0, 0, 1, 2, 3, 3]), torch.tensor([0, 1, 2, 0, 3, 4])  # text 0 under items 0 and 2
    sounds = same_text_metrics(items, texts, owner, keys, item="a")
    pictures = same_text_metrics(items, texts, owner, keys)
    assert set(sounds) == {k.replace("t2i", "t2a").replace("i2t", "a2t") for k in pictures}
    assert sounds["t2a_r1"] == pictures["t2i_r1"] and "a2t_map" not in sounds
