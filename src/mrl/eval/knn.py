"""Exact nearest-neighbour search on L2-normalised prefixes, and k-NN classification from its result.

Every prefix ``z[:, :d]`` is normalised *after* truncation (a prefix of a unit vector is not a unit
vector), then searched by inner product, which equals cosine similarity. Search is exact (faiss flat
index, on the GPU when faiss has one), with the database and the queries both taken in chunks so memory
stays bounded for databases larger than RAM-friendly float32 copies.
"""

from __future__ import annotations

import faiss
import numpy as np


def normalized_prefix(x: np.ndarray, d: int) -> np.ndarray:
    """``x[:, :d]`` as contiguous float32 rows of unit L2 norm (zero rows stay zero)."""
    prefix = np.array(x[:, :d], dtype=np.float32, order="C")  # a copy: the input may be a read-only memmap
    norms = np.linalg.norm(prefix, axis=1, keepdims=True)
    prefix /= np.maximum(norms, 1e-12)
    return prefix


def _gpu_available() -> bool:
    return hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0


def _search_block(
    db: np.ndarray, queries: np.ndarray, k: int, use_gpu: bool
) -> tuple[np.ndarray, np.ndarray]:
    if use_gpu:  # pragma: no cover - needs faiss-gpu
        res = faiss.StandardGpuResources()
        return faiss.knn_gpu(res, queries, db, k, metric=faiss.METRIC_INNER_PRODUCT)
    return faiss.knn(queries, db, k, metric=faiss.METRIC_INNER_PRODUCT)


def exact_search(
    database: np.ndarray,
    queries: np.ndarray,
    d: int,
    k: int,
    query_chunk: int = 4096,
    db_chunk: int = 262_144,
    use_gpu: bool | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` database rows by cosine similarity of the size-``d`` prefixes, best first.

    Returns ``(scores, indices)`` of shape ``(len(queries), k)``. ``database`` may be a float16
    memmap: each database chunk is converted and normalised once, searched by all query chunks, and the
    per-chunk results are merged, so at most one float32 chunk of the database is in memory.
    """
    n = len(database)
    k = min(int(k), n)
    use_gpu = _gpu_available() if use_gpu is None else use_gpu
    nq = len(queries)
    best_scores = np.full((nq, k), -np.inf, dtype=np.float32)
    best_ids = np.full((nq, k), -1, dtype=np.int64)
    q_norm = [normalized_prefix(queries[s : s + query_chunk], d) for s in range(0, nq, query_chunk)]
    for start in range(0, n, db_chunk):
        block = normalized_prefix(database[start : start + db_chunk], d)
        kb = min(k, len(block))
        for qi, q in enumerate(q_norm):
            rows = slice(qi * query_chunk, qi * query_chunk + len(q))
            scores, ids = _search_block(block, q, kb, use_gpu)
            if start == 0 and n <= db_chunk:
                best_scores[rows], best_ids[rows] = scores, ids
                continue
            merged_s = np.concatenate([best_scores[rows], scores], axis=1)
            merged_i = np.concatenate([best_ids[rows], ids + start], axis=1)
            # stable sort on -score keeps earlier (lower-index) rows first among equal scores
            order = np.argsort(-merged_s, axis=1, kind="stable")[:, :k]
            best_scores[rows] = np.take_along_axis(merged_s, order, axis=1)
            best_ids[rows] = np.take_along_axis(merged_i, order, axis=1)
    return best_scores, best_ids


def knn_predict(neighbor_labels: np.ndarray, k: int, num_classes: int) -> np.ndarray:
    """Majority vote among the first ``k`` neighbours (rows best first).

    Ties go to the class whose best-ranked member is nearest, so ``k=1`` is exactly 1-NN.
    """
    labels = neighbor_labels[:, :k]
    nq = len(labels)
    rows = np.repeat(np.arange(nq), labels.shape[1])
    counts = np.zeros((nq, num_classes), dtype=np.int64)
    np.add.at(counts, (rows, labels.ravel()), 1)
    first = np.full((nq, num_classes), k, dtype=np.int64)
    ranks = np.tile(np.arange(labels.shape[1]), nq)
    np.minimum.at(first, (rows, labels.ravel()), ranks)
    # counts dominate; among equal counts the smaller first rank wins (first < k+1)
    return np.argmax(counts * (k + 1) - first, axis=1)


def knn_accuracy(neighbor_labels: np.ndarray, query_labels: np.ndarray, k: int, num_classes: int) -> float:
    """Fraction of queries whose k-NN majority vote is their label."""
    return float(np.mean(knn_predict(neighbor_labels, k, num_classes) == query_labels))
