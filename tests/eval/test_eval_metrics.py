"""kNN search, k-NN vote and retrieval metrics against brute-force numpy references."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from mrl.eval.knn import exact_search, knn_accuracy, knn_predict, normalized_prefix
from mrl.eval.retrieval import retrieval_metrics

WHOLE = {"query_chunk": 4096, "db_chunk": 262_144, "use_gpu": False}  # conf/eval.yaml's chunks: one of each


def _brute_force(db: np.ndarray, q: np.ndarray, d: int, k: int) -> np.ndarray:
    def unit(x):
        x = x[:, :d].astype(np.float64)  # truncate first, then normalise
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    sims = unit(q) @ unit(db).T
    return np.argsort(-sims, axis=1, kind="stable")[:, :k]


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    return rng.normal(size=(300, 32)).astype(np.float32), rng.normal(size=(40, 32)).astype(np.float32)


@pytest.mark.parametrize("d", [1, 4, 32])
def test_exact_search_matches_brute_force(data, d):
    db, q = data
    scores, ids = exact_search(db, q, d, 7, **WHOLE)
    ref = _brute_force(db, q, d, 7)
    if d == 1:  # 1-d unit vectors are +-1: only the scores are unique
        np.testing.assert_allclose(np.abs(scores), 1, atol=1e-5)
        return
    np.testing.assert_array_equal(ids, ref)
    np.testing.assert_allclose(
        scores, np.sort(normalized_prefix(q, d) @ normalized_prefix(db, d).T, 1)[:, ::-1][:, :7], atol=1e-5
    )


def test_exact_search_in_chunks_and_float16_memmap(tmp_path, data):
    db, q = data
    path = tmp_path / "db.npy"
    mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=db.shape)
    mm[:] = db
    mm.flush()
    db16 = np.load(path, mmap_mode="r")
    _, chunked = exact_search(db16, q, 16, 5, query_chunk=7, db_chunk=64, use_gpu=False)
    _, whole = exact_search(np.asarray(db16, dtype=np.float32), q, 16, 5, **WHOLE)
    np.testing.assert_array_equal(chunked, whole)
    np.testing.assert_array_equal(whole, _brute_force(np.asarray(db16, dtype=np.float32), q, 16, 5))


def test_normalize_after_truncation():
    x = np.array([[3.0, 4.0, 100.0]], dtype=np.float32)
    np.testing.assert_allclose(normalized_prefix(x, 2), [[0.6, 0.8]])


def test_knn_vote_matches_counter_reference():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 5, size=(200, 9))
    pred = knn_predict(labels, 9, 5)
    for row, p in zip(labels, pred, strict=True):
        counts = Counter(row.tolist())
        best = max(counts.values())
        tied = [c for c in counts if counts[c] == best]
        # ties: the class met first in the ranking
        assert p == min(tied, key=lambda c: row.tolist().index(c))
    np.testing.assert_array_equal(knn_predict(labels, 1, 5), labels[:, 0])
    y = labels[:, 0]
    assert knn_accuracy(labels, y, 1, 5) == 1.0


def test_hand_computed_retrieval_example():
    # query of class 0; ranked neighbour labels 0, 1, 0, 0, 1; the database holds 4 items of class 0
    neighbors = np.array([[0, 1, 0, 0, 1]])
    db_labels = np.array([0, 0, 0, 0, 1, 1])
    m = retrieval_metrics(neighbors, np.array([0]), db_labels, [1, 3, 5])
    # precision@i at the hits i = 1, 3, 4: 1, 2/3, 3/4; the paper divides their sum by k
    assert m["map@5"] == pytest.approx((1 + 2 / 3 + 3 / 4) / 5)
    assert m["map@3"] == pytest.approx((1 + 2 / 3) / 3)
    assert m["map@1"] == pytest.approx(1.0)
    assert m["precision@5"] == pytest.approx(3 / 5)
    assert m["recall@5"] == pytest.approx(3 / 4)
    assert m["recall@3"] == pytest.approx(2 / 4)
    assert m["hit@1"] == 1.0
    miss = retrieval_metrics(np.array([[1, 1, 0]]), np.array([0]), db_labels, [2, 3])
    assert miss["hit@2"] == 0.0 and miss["hit@3"] == 1.0 and miss["map@3"] == pytest.approx((1 / 3) / 3)


def test_retrieval_metrics_match_loop_reference():
    rng = np.random.default_rng(2)
    db_labels = rng.integers(0, 4, size=500)
    q_labels = rng.integers(0, 4, size=60)
    neighbors = db_labels[rng.integers(0, 500, size=(60, 12))]
    m = retrieval_metrics(neighbors, q_labels, db_labels, [5, 12])
    for k in (5, 12):
        aps, precs, recs, hits = [], [], [], []
        for row, y in zip(neighbors, q_labels, strict=True):  # the paper's per-query loop
            matches = row[:k] == y
            tps = np.cumsum(matches)
            aps.append(np.sum((tps / np.arange(1, k + 1))[matches]) / k)
            precs.append(matches.sum() / k)
            recs.append(matches.sum() / np.sum(db_labels == y))
            hits.append(matches.any())
        assert m[f"map@{k}"] == pytest.approx(np.mean(aps))
        assert m[f"precision@{k}"] == pytest.approx(np.mean(precs))
        assert m[f"recall@{k}"] == pytest.approx(np.mean(recs))
        assert m[f"hit@{k}"] == pytest.approx(np.mean(hits))


def test_exact_search_with_chunks_capped_by_bytes(monkeypatch, data):
    import mrl.eval.knn as knn

    db, q = data
    monkeypatch.setattr(knn, "CHUNK_BYTES", 16 * 4 * 50)  # 50 rows of 16 floats per chunk: 6 chunks
    assert knn.chunk_rows(262_144, 16) == 50
    _, ids = exact_search(db, q, 16, 9, **WHOLE)
    np.testing.assert_array_equal(ids, _brute_force(db, q, 16, 9))


def _counting_vote(labels: np.ndarray, k: int, num_classes: int) -> np.ndarray:
    """The former vote: a (queries, classes) count table, ties to the smallest first rank."""
    labels = labels[:, :k]
    nq = len(labels)
    rows = np.repeat(np.arange(nq), labels.shape[1])
    counts = np.zeros((nq, num_classes), dtype=np.int64)
    np.add.at(counts, (rows, labels.ravel()), 1)
    first = np.full((nq, num_classes), k, dtype=np.int64)
    np.minimum.at(first, (rows, labels.ravel()), np.tile(np.arange(labels.shape[1]), nq))
    return np.argmax(counts * (k + 1) - first, axis=1)


@pytest.mark.parametrize("k", [1, 2, 5, 10])
def test_knn_vote_equals_counting_table(k):
    rng = np.random.default_rng(k)
    labels = rng.integers(0, 6, size=(500, 12))  # few classes: many ties
    np.testing.assert_array_equal(knn_predict(labels, k), _counting_vote(labels, k, 6))


def test_exact_search_transform_equals_search_of_transformed_database(data):
    db, q = data
    rot = np.linalg.qr(np.random.default_rng(3).normal(size=(32, 32)))[0].astype(np.float32)
    _, want = exact_search(db @ rot, q @ rot, 8, 5, **WHOLE)
    _, got = exact_search(
        db, q, 8, 5, query_chunk=7, db_chunk=50, use_gpu=False, transform=lambda x: np.asarray(x) @ rot
    )
    np.testing.assert_array_equal(got, want)
