"""Adaptive classification cascade arithmetic and funnel retrieval against references."""

from __future__ import annotations

import numpy as np
import pytest

from mrl.eval.adaptive_classification import adaptive_classification, cascade, cascade_stats, fit_thresholds
from mrl.eval.adaptive_retrieval import (
    FunnelIndex,
    FunnelSearch,
    FunnelSettings,
    adaptive_retrieval,
    exact_retrieval,
    funnel_mflops,
    rerank,
)
from mrl.eval.knn import exact_search, normalized_prefix

# conf/eval.yaml's values; the tests that depend on one pass it explicitly
SETTINGS = FunnelSettings(
    hnsw_m=16,
    hnsw_ef_construction=40,
    hnsw_ef_search=200,
    query_chunk=4096,
    db_chunk=262_144,
    block_floats=1 << 20,
)
CURVE = {"targets": None, "calibration_fraction": 0.5, "grid_size": 101, "seed": 0}


def search(db: np.ndarray, q: np.ndarray, d: int, k: int) -> np.ndarray:
    return exact_search(db, q, d, k, SETTINGS.query_chunk, SETTINGS.db_chunk, use_gpu=False)[1]


def funnel(db, q, shortlist_size, rerank_sizes, shortlists, hnsw=False, **settings) -> np.ndarray:
    """The final ranking of one funnel, through the path mrl-eval takes (:class:`FunnelSearch`)."""
    settings = FunnelSettings(**{**SETTINGS.__dict__, **settings})
    ids, seconds = FunnelSearch(db, q, shortlist_size, hnsw, settings).run(rerank_sizes, shortlists)
    assert seconds > 0
    return ids


def test_cascade_hand_made_example():
    sizes = [8, 16, 32]
    conf = np.array([[0.9, 0.3, 0.2, 0.5], [0.1, 0.8, 0.3, 0.5], [0.5, 0.5, 0.5, 0.5]])
    correct = np.array([[1, 0, 0, 0], [0, 1, 0, 1], [0, 0, 1, 1]], dtype=bool)
    # thresholds 0.5, 0.5: query 0 stops at 8 (0.9 > 0.5); query 1 at 16; query 2 at 32; query 3's 0.5
    # is not above 0.5 at 8 nor at 16, so it reaches 32
    np.testing.assert_array_equal(cascade(conf, [0.5, 0.5]), [0, 1, 2, 2])
    stats = cascade_stats(conf, correct, sizes, [0.5, 0.5])
    assert stats["accuracy"] == pytest.approx(4 / 4)
    assert stats["expected_size"] == pytest.approx((8 + 16 + 32 + 32) / 4)
    assert stats["total_size"] == pytest.approx((8 + 24 + 56 + 56) / 4)


def test_thresholds_zero_and_one_are_the_smallest_and_largest_size():
    rng = np.random.default_rng(0)
    conf = rng.uniform(0.1, 1.0, size=(4, 300))
    conf[:, :5] = 1.0  # fully confident queries must still move on with thresholds 1
    correct = rng.random((4, 300)) < np.array([[0.3], [0.5], [0.6], [0.8]])
    sizes = [2, 4, 8, 16]
    low = cascade_stats(conf, correct, sizes, [0, 0, 0])
    high = cascade_stats(conf, correct, sizes, [1, 1, 1])
    assert low["accuracy"] == pytest.approx(correct[0].mean()) and low["expected_size"] == 2
    assert high["accuracy"] == pytest.approx(correct[-1].mean()) and high["expected_size"] == 16
    assert high["total_size"] == 30 and low["total_size"] == 2


def test_fit_thresholds_grid_search_reference():
    rng = np.random.default_rng(3)
    conf = rng.random((3, 200))
    correct = rng.random((3, 200)) < conf  # confident answers are more often right
    grid = np.linspace(0, 1, 21)
    target = 0.7
    got = fit_thresholds(conf, correct, target, grid)
    reach = np.ones(200, dtype=bool)
    for g in range(2):  # loop reference: smallest t whose stopped queries are >= target accurate
        for t in grid:
            stop = reach & (conf[g] > t)
            if stop.sum() == 0 or correct[g, stop].mean() >= target:
                break
        assert got[g] == pytest.approx(t)
        reach &= ~(conf[g] > t)


def test_curve_monotone_in_target():
    rng = np.random.default_rng(4)
    labels = rng.integers(0, 3, size=400)
    conf = rng.random((3, 400))
    pred = np.where(rng.random((3, 400)) < conf * np.array([[0.6], [0.8], [1.0]]), labels, (labels + 1) % 3)
    curve = adaptive_classification(pred, conf, labels, [4, 8, 16], num_targets=5, num_splits=3, **CURVE)
    assert len(curve) == 5
    sizes = [c["expected_size"] for c in curve]
    assert sizes == sorted(sizes) and sizes[0] >= 4 and sizes[-1] <= 16
    for c in curve:
        assert (
            set(c) >= {"expected_size", "total_size", "accuracy", "thresholds"} and len(c["thresholds"]) == 2
        )
        assert c["total_size"] >= c["expected_size"]


def test_funnel_mflops_formula():
    # the paper's funnel on ImageNet-1K: 8-d over 1.28M items, then 200x16 + 100x32 + 50x64 + 25x128 + 10x2048
    n = 1_281_167
    expected = (8 * n + 200 * 16 + 100 * 32 + 50 * 64 + 25 * 128 + 10 * 2048) / 1e6
    assert funnel_mflops(n, 8, [16, 32, 64, 128, 2048], [200, 100, 50, 25, 10]) == pytest.approx(expected)


@pytest.fixture
def clustered():
    rng = np.random.default_rng(5)
    centers = rng.normal(size=(5, 64))
    db_y, q_y = rng.integers(0, 5, 400), rng.integers(0, 5, 50)
    db = (centers[db_y] + rng.normal(size=(400, 64))).astype(np.float32)
    q = (centers[q_y] + rng.normal(size=(50, 64))).astype(np.float32)
    return db, db_y, q, q_y


def test_funnel_with_whole_database_shortlist_is_exact_search(clustered):
    db, _, q, _ = clustered
    ids = funnel(db, q, 4, [64], [len(db)], query_chunk=16)
    exact = search(db, q, 64, len(db))
    np.testing.assert_array_equal(ids, exact)
    # a multi-stage funnel whose stages all keep the whole database also ends with the exact ranking
    ids = funnel(db, q, 2, [8, 64], [len(db), len(db)], query_chunk=16)
    np.testing.assert_array_equal(ids[:, :10], exact[:, :10])


def test_rerank_reference(clustered):
    db, _, q, _ = clustered
    ids = funnel(db, q, 8, [32], [20])
    short = search(db, q, 8, 20)
    for row, cand, query in zip(ids, short, q, strict=True):  # per query: rerank the shortlist at 32-d
        x = db[cand, :32] / np.linalg.norm(db[cand, :32], axis=1, keepdims=True)
        order = np.argsort(-(x @ (query[:32] / np.linalg.norm(query[:32]))), kind="stable")
        np.testing.assert_array_equal(row, cand[order])


def test_adaptive_retrieval_report(clustered):
    db, db_y, q, q_y = clustered
    exact = exact_retrieval(db, db_y, q, q_y, 10, SETTINGS.query_chunk, SETTINGS.db_chunk)
    rows = adaptive_retrieval(
        db, db_y, q, q_y, [(8, [16, 64], [50, 10]), (4, [64], [len(db)])], 10, False, SETTINGS
    )
    assert rows[1]["map@10"] == pytest.approx(exact["map@10"]) and rows[1]["top1"] == exact["top1"]
    assert rows[0]["mflops_per_query"] == pytest.approx((8 * 400 + 50 * 16 + 10 * 64) / 1e6)
    for r in rows:
        assert 0 <= r["map@10"] <= 1 and r["seconds_per_query"] > 0
    flat, hnsw = adaptive_retrieval(db, db_y, q, q_y, [(8, [64], [100])], 10, True, SETTINGS)
    assert flat["index"] == "flat" and hnsw["index"] == "hnsw"
    assert hnsw["map@10"] == pytest.approx(flat["map@10"], abs=0.05)


def _old_table_rerank(db: np.ndarray, q: np.ndarray, cand: np.ndarray, d: int, keep: int) -> np.ndarray:
    """The former implementation: a normalised table of the whole database per rerank size."""
    table = normalized_prefix(db, d)
    rows = np.take(table, cand.ravel(), axis=0).reshape(*cand.shape, d)
    scores = np.matmul(rows, normalized_prefix(q, d)[:, :, None])[..., 0]
    order = np.argsort(-scores, axis=1, kind="stable")[:, :keep]
    return np.take_along_axis(cand, order, axis=1)


def test_rerank_on_memmap_rows_equals_normalised_table(tmp_path, clustered):
    db, _, q, _ = clustered
    path = tmp_path / "db.npy"
    np.save(path, db)
    mm = np.load(path, mmap_mode="r")
    cand = search(db, q, 8, 40)
    want = _old_table_rerank(db, q, cand, 32, 15)
    np.testing.assert_array_equal(rerank(mm, q, cand, 32, 15, SETTINGS.block_floats), want)
    # tiny gather blocks (one query at a time) give the same ranking as one block
    np.testing.assert_array_equal(rerank(mm, q, cand, 32, 15, block_floats=1), want)
    # the whole funnel, stage by stage, on the memmap
    ids = funnel(mm, q, 8, [16, 64], [40, 10], query_chunk=7)
    np.testing.assert_array_equal(
        ids, _old_table_rerank(db, q, _old_table_rerank(db, q, cand, 16, 10), 64, 10)
    )


def test_hnsw_funnel_with_whole_database_shortlist_is_exact_search(clustered):
    db, _, q, _ = clustered
    ids = funnel(db, q, 8, [64], [len(db)], hnsw=True, query_chunk=16)
    exact = search(db, q, 64, 10)
    # HNSW may miss a few of the 400 items, but the top 10 at full size are all found and reranked exactly
    np.testing.assert_array_equal(ids[:, :10], exact)


def test_shared_shortlist_rows_equal_separate_runs(clustered):
    db, db_y, q, q_y = clustered
    funnels = [(8, [16, 64], [50, 10]), (8, [64], [50]), (4, [64], [30])]
    together = adaptive_retrieval(db, db_y, q, q_y, funnels, 10, False, SETTINGS)
    for f, row in zip(funnels, together, strict=True):
        (alone,) = adaptive_retrieval(db, db_y, q, q_y, [f], 10, False, SETTINGS)
        assert row["map@10"] == alone["map@10"] and row["top1"] == alone["top1"]
        assert (row["shortlist_size"], row["rerank_sizes"], row["shortlists"]) == (f[0], f[1], f[2])


def test_funnels_with_the_same_first_shortlist_search_it_once(clustered, monkeypatch):
    db, _, q, _ = clustered
    lengths = []
    real = FunnelIndex.shortlist
    monkeypatch.setattr(
        FunnelIndex, "shortlist", lambda self, queries, k: lengths.append(k) or real(self, queries, k)
    )
    search = FunnelSearch(db, q, 8, False, SETTINGS)
    two_stage, _ = search.run([16, 64], [50, 10])
    one_stage, _ = search.run([64], [50])
    other, _ = search.run([64], [30])
    assert lengths == [50, 30]  # the second funnel reused the first one's shortlist
    np.testing.assert_array_equal(one_stage[:, :10], funnel(db, q, 8, [64], [50])[:, :10])
    assert two_stage.shape == (len(q), 10) and other.shape == (len(q), 30)
