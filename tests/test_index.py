"""Search index: exact top-k against brute force (including the proof that lets its product run in
low precision), the cached folder and its fingerprint, and FAISS indexes with their measured recall."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch

import mmret.inference.exact as index_mod
from mmret.errors import MmretError
from mmret.inference.index import (
    ExactIndex,
    IndexConfig,
    build_index,
    ensure_index,
    open_index,
    recall_at_k,
    vectors_digest,
)


def _gallery(n: int, dim: int, seed: int = 0, clusters: int = 0) -> np.ndarray:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g)
    if clusters:
        x = torch.randn(clusters, dim, generator=g)[torch.randint(clusters, (n,), generator=g)] + 0.5 * x
    return torch.nn.functional.normalize(x, dim=1).half().numpy()


def _queries(n: int, dim: int, seed: int = 1) -> np.ndarray:
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, dim, generator=g), dim=1).numpy()


def _brute_force(gallery: np.ndarray, queries: np.ndarray, k: int):
    """float64 scores, best first, equal scores by smaller row."""
    scores = queries.astype(np.float64) @ gallery.astype(np.float64).T
    order = np.lexsort((np.broadcast_to(np.arange(len(gallery)), scores.shape), -scores), axis=1)[:, :k]
    return np.take_along_axis(scores, order, 1), order


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 1000 rows (the gallery is not a multiple of them) and query blocks of 7, so that
    both loops are exercised."""
    monkeypatch.setattr(index_mod, "_ROWS_PER_CHUNK", 1000)
    monkeypatch.setattr(index_mod, "_SCORE_BUDGET", 7 * 6007)


@pytest.mark.parametrize("n_queries", [1, 2, 5, 40])  # float16 for 1 and 2, the bfloat16 copy (else float32) for 5
@pytest.mark.parametrize("k", [1, 10, 100])
def test_exact_top_k_equals_brute_force(small_chunks, n_queries, k):
    gallery, queries = _gallery(6007, 64), _queries(n_queries, 64)
    scores, ids = ExactIndex(gallery).search(queries, k)
    want_scores, want_ids = _brute_force(gallery, queries, k)
    assert ids.shape == (n_queries, k) and ids.dtype == np.int64 and scores.dtype == np.float32
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(scores, want_scores, atol=1e-6)


@pytest.mark.parametrize("native_bf16", [True, False])
def test_small_batches_read_a_bfloat16_copy_made_once_and_stay_exact(small_chunks, monkeypatch, native_bf16):
    if not native_bf16:  # as on a CPU that emulates bfloat16 (slower than float32): no copy, float32 chunks
        monkeypatch.setattr(index_mod, "bf16_supported", lambda device: False)
    elif not index_mod.bf16_supported(torch.device("cpu")):
        pytest.skip("this CPU has no native bfloat16")
    gallery, queries = _gallery(6007, 64, clusters=30), _queries(4, 64)
    index = ExactIndex(gallery)
    index.search(queries[:2], 10)  # one or two queries: float16 products, no copy
    assert index._bf16 is None
    scores, ids = index.search(queries, 10)
    np.testing.assert_array_equal(ids, _brute_force(gallery, queries, 10)[1])
    assert (index._bf16 is not None) == native_bf16
    if native_bf16:
        copy = index._bf16
        index.search(queries[:3], 5)
        assert index._bf16 is copy  # made once
        q = torch.from_numpy(queries)  # the same scores as the chunked bfloat16 product
        assert torch.equal(index_mod._product(q, index.gallery, "bf16", copy), index_mod._product(q, index.gallery,
                                                                                                   "bf16"))
    monkeypatch.setattr(index_mod, "_BF16_COPY_MAX_BYTES", 6007 * 64 * 2 - 1)  # a gallery too large for a copy
    assert not ExactIndex(gallery)._copy_allowed()


def _count_rescored(monkeypatch) -> list[int]:
    rescored = []
    real = index_mod._exact_scores
    monkeypatch.setattr(index_mod, "_exact_scores", lambda q, g, queries, rows: rescored.append(len(rows)) or
                        real(q, g, queries, rows))
    return rescored


@pytest.mark.parametrize("n_queries", [2, 4, 40])  # float16, the bfloat16 copy (or float32) and bfloat16 chunks
@pytest.mark.parametrize("kernels_pass_their_check", [True, False])
def test_duplicates_tie_by_row(small_chunks, monkeypatch, n_queries, kernels_pass_their_check):
    if not kernels_pass_their_check:  # as on a machine whose float16 / bfloat16 products are off
        monkeypatch.setattr(index_mod, "_product_within_bound", lambda precision: False)
    gallery = _gallery(5000, 32)
    gallery[[4100, 17, 2600, 900] + list(range(3000, 3300))] = gallery[123]  # 305 identical rows
    rescored = _count_rescored(monkeypatch)
    d = min(n_queries, 3)  # queries equal to the duplicated row; the others are random
    queries = np.stack([gallery[123].astype(np.float32)] * d + [_queries(1, 32)[0]] * (n_queries - d))
    scores, ids = ExactIndex(gallery).search(queries, 10)
    # 305 rows tie at the top, more than k + _SPARE: every one is rescored, and the smallest rows win
    assert sum(rescored) >= d * 305 > d * (10 + index_mod._SPARE)
    np.testing.assert_array_equal(ids[:d], [[17, 123, 900, 2600, 3000, 3001, 3002, 3003, 3004, 3005]] * d)
    assert (scores[:d] == scores[0, 0]).all()
    np.testing.assert_array_equal(ids[d:], _brute_force(gallery, queries[d:], 10)[1])


@pytest.mark.parametrize("precision", ["fp16", "fp32", "bf16"])
def test_product_error_stays_within_its_bound(precision):
    gallery, queries = torch.from_numpy(_gallery(3000, 384, seed=2)), torch.from_numpy(_queries(5, 384))
    queries = queries * torch.tensor([[0.5], [1.0], [2.0], [1.0], [1.0]])  # the bound scales with |q|
    approx = index_mod._product(queries, gallery, precision).double()
    exact = queries.double() @ gallery.double().T
    bound = index_mod._error_bound(queries, index_mod._max_row_norm(gallery), precision)
    err = (approx - exact).abs().max(1).values
    assert (err <= bound).all()
    assert (err > bound / (5000 if precision == "fp32" else 50)).all()  # and the bound is not vacuous
    assert index_mod._product_within_bound(precision)


@pytest.mark.parametrize("n_queries", [1, 3, 40])  # float16's, bfloat16's (float32's without native bf16) bound
def test_result_is_exact_with_a_product_as_bad_as_its_bound(small_chunks, monkeypatch, n_queries):
    """A product whose every score is off by up to the full error bound still gives exact results:
    the rows its errors could misplace are rescored."""
    gallery, queries = _gallery(4000, 48, seed=3, clusters=20), _queries(n_queries, 48, seed=4)
    g = torch.Generator().manual_seed(0)

    def noisy_product(q, gal, precision, copy=None):
        scores = q @ gal.float().T
        bound = index_mod._error_bound(q, 1.0, precision)[:, None]
        return scores + bound * (2 * torch.rand(scores.shape, generator=g) - 1) * 0.99

    monkeypatch.setattr(index_mod, "_product", noisy_product)
    rescored = _count_rescored(monkeypatch)
    _, ids = ExactIndex(gallery).search(queries, 10)
    np.testing.assert_array_equal(ids, _brute_force(gallery, queries, 10)[1])
    if n_queries >= index_mod._BF16_MIN_QUERIES:  # bfloat16's bound is wide enough to reorder rows
        assert sum(rescored) > 10 * n_queries  # the noise made more rows candidates than k


def test_search_arguments():
    index = ExactIndex(_gallery(50, 8))
    scores, ids = index.search(_queries(1, 8)[0], 80)  # one 1-d query; k larger than the gallery
    assert ids.shape == (1, 50) and sorted(ids[0].tolist()) == list(range(50))
    assert (np.diff(scores[0]) <= 0).all()
    with pytest.raises(MmretError, match="must have 8 dims"):
        index.search(_queries(2, 9), 5)
    with pytest.raises(MmretError, match="NaN"):
        index.search(np.full((1, 8), np.nan, dtype=np.float32), 5)
    with pytest.raises(MmretError, match="k must be at least 1"):
        index.search(_queries(1, 8), 0)
    with pytest.raises(MmretError, match="float16"):
        ExactIndex(np.zeros((4, 8), dtype=np.float32))


def _save(path, array):
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, array)
    os.replace(tmp, path)  # how mmret writes every file: a new inode, never rewritten in place
    return path


FP = {"model": "run-a", "checkpoint": "best@1200", "dataset": "coco", "split": "test"}


def test_folder_is_built_once_and_a_stale_one_refused(tmp_path):
    emb = _save(tmp_path / "emb.npy", _gallery(700, 16))
    folder = tmp_path / "runs" / "r" / "index" / "coco-test"
    index = ensure_index(emb, folder, FP)
    assert isinstance(index, ExactIndex) and index.n == 700
    assert os.stat(folder / "vectors.npy").st_ino == os.stat(emb).st_ino  # hard link, no copy
    meta_mtime = os.stat(folder / "meta.json").st_mtime_ns
    q = _queries(3, 16)
    again = ensure_index(emb, folder, FP)
    assert os.stat(folder / "meta.json").st_mtime_ns == meta_mtime  # reused, not rebuilt
    np.testing.assert_array_equal(again.search(q, 5)[1], index.search(q, 5)[1])

    with pytest.raises(MmretError, match=r"built for checkpoint=best@1200, model=run-a, not "
                                         r"checkpoint=last@3000, model=run-b.*delete"):
        open_index(folder, dict(FP, model="run-b", checkpoint="last@3000"))
    with pytest.raises(MmretError, match="another model or dataset"):
        ensure_index(emb, folder, dict(FP, dataset="flickr30k"))

    _save(emb, _gallery(700, 16, seed=9))  # new embeddings under the old fingerprint
    with pytest.raises(MmretError, match="embeddings changed since the index"):
        ensure_index(emb, folder, FP)
    old = open_index(folder, FP)  # the index still holds the vectors it was built from
    np.testing.assert_array_equal(old.search(q, 5)[1], index.search(q, 5)[1])
    rebuilt = ensure_index(emb, folder, FP, rebuild=True)
    np.testing.assert_array_equal(rebuilt.search(q, 5)[1], _brute_force(_gallery(700, 16, seed=9), q, 5)[1])


def test_damaged_or_missing_folders(tmp_path):
    with pytest.raises(MmretError, match="no index in"):
        open_index(tmp_path / "nothing", FP)
    folder = tmp_path / "idx"
    build_index(_gallery(100, 8), folder, FP)  # from an array: saved, not linked
    with pytest.raises(MmretError, match="no hnsw index has been built"):
        open_index(folder, FP, "hnsw")
    np.save(folder / "vectors.npy", _gallery(100, 8, seed=5))  # someone overwrote the vectors
    with pytest.raises(MmretError, match="do not match its meta.json"):
        open_index(folder, FP)
    (folder / "meta.json").write_text("{not json")
    with pytest.raises(MmretError, match="damaged"):
        open_index(folder, FP)
    with pytest.raises(MmretError, match="no embeddings at"):
        ensure_index(tmp_path / "missing.npy", tmp_path / "idx2", FP)
    with pytest.raises(MmretError, match="fingerprint"):
        build_index(_gallery(10, 8), tmp_path / "idx3", {})


def test_vectors_digest_sees_changes_in_sampled_rows():
    a = _gallery(10_000, 8)
    b = a.copy()
    b[-1, 0] += np.float16(0.5)
    assert vectors_digest(a) == vectors_digest(a.copy()) != vectors_digest(b)


def _exact_top10(gallery, queries):
    return _brute_force(gallery, queries, 10)[1]


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_faiss_index_recall_is_measured_against_exact_search(tmp_path, kind):
    pytest.importorskip("faiss")
    gallery = _gallery(4000, 32, seed=6, clusters=40)
    check = _gallery(300, 32, seed=7, clusters=40).astype(np.float32)  # caption-like queries
    emb = _save(tmp_path / "emb.npy", gallery)
    index = ensure_index(emb, tmp_path / "idx", FP, IndexConfig(kind=kind, check_queries=300), queries=check)
    info = index.info
    assert info["factory"].endswith("SQfp16") and info["recall_queries"] == "given queries"
    assert info["n_check_queries"] == 300
    # the stored recall is what the index really gives at the stored breadth on those queries
    assert recall_at_k(index.search(check, 10)[1], _exact_top10(gallery, check)) == pytest.approx(info["recall@10"],
                                                                                                  abs=1e-4)
    assert info["recall@10"] >= 0.95
    chosen = [step for step in info["tuning"] if step["breadth"] == info["breadth"]][0]
    assert chosen["recall@10"] == info["recall@10"] >= 0.95
    # the smallest breadth tried that reaches the target: every smaller one tried falls short
    assert all(step["recall@10"] < 0.95 for step in info["tuning"] if step["breadth"] < info["breadth"])
    assert len(info["tuning"]) > 1 or info["breadth"] == (1 if kind == "ivf" else 16)
    # reopened from disk with the tuned breadth
    reopened = open_index(tmp_path / "idx", FP, kind)
    np.testing.assert_array_equal(reopened.search(check[:20], 10)[1], index.search(check[:20], 10)[1])


def test_faiss_fixed_breadth_reports_the_recall_it_gets(tmp_path):
    pytest.importorskip("faiss")
    gallery = _gallery(4000, 32, seed=8, clusters=40)
    cfg = IndexConfig(kind="ivf", nlist=64, nprobe=1)
    index = build_index(gallery, tmp_path / "idx", FP, cfg)  # no queries: gallery rows, own row left out
    info = index.info
    assert info["breadth"] == 1 and info["recall_queries"].startswith("gallery rows")
    assert info["recall@10"] < 0.95  # one list of 64 misses neighbours, and says so
    # search parameters change: tuned again without rebuilding the index file
    mtime = os.stat(tmp_path / "idx" / "ivf.faiss").st_mtime_ns
    emb = _save(tmp_path / "emb.npy", gallery)
    tuned = ensure_index(emb, tmp_path / "idx", FP, IndexConfig(kind="ivf", nlist=64))
    assert os.stat(tmp_path / "idx" / "ivf.faiss").st_mtime_ns == mtime
    assert tuned.info["breadth"] > 1 and tuned.info["recall@10"] >= 0.95


def test_missing_faiss_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss now raises ImportError
    with pytest.raises(MmretError, match=r"pip install 'mmret\[faiss\]'"):
        build_index(_gallery(100, 8), tmp_path / "idx", FP, IndexConfig(kind="hnsw"))
    assert not (tmp_path / "idx").exists()  # nothing half-built left behind


def test_index_config_validation():
    with pytest.raises(MmretError, match="--index must be one of exact, ivf, hnsw"):
        IndexConfig(kind="annoy")
    with pytest.raises(MmretError, match="--target-recall"):
        IndexConfig(target_recall=1.5)
    with pytest.raises(MmretError, match="--nprobe"):
        IndexConfig(nprobe=-1)
