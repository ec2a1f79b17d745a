"""Exact nearest-neighbour search on L2-normalised prefixes, and k-NN classification from its result.

Every prefix ``z[:, :d]`` is normalised *after* truncation (a prefix of a unit vector is not a unit
vector), then searched by inner product, which equals cosine similarity. Search is exact (faiss flat
index, on the GPU when faiss has one), with the database and the queries both taken in chunks so memory
stays bounded: the only database-sized thing is the (possibly memory-mapped) embeddings themselves; a
normalised float32 database chunk is at most ``CHUNK_BYTES`` (32 MiB).

When the queries are the database's own items (the same split, or two split names for the same data:
query ``i`` is database row ``i``), a search with ``exclude_self`` leaves each query's own row out of its
neighbours, as retrieval benchmarks do: otherwise every query finds itself first (1-NN 100%).
:func:`leave_self_out` is that step for any search that returns one more neighbour than asked for.
"""

from __future__ import annotations

from collections.abc import Callable

import faiss
import numpy as np

from mrl.config_checks import Node, mapping, positive_int
from mrl.eval.progress import stage_progress

# Largest float32 database chunk normalised at once (32 MiB): the chunk is the search's only working
# copy of the database; faiss computes in 4096 x 1024 tiles anyway, and each extra chunk only adds a
# (queries x 2k) merge.
CHUNK_BYTES = 32 << 20
# The nearest neighbours of the size-d prefixes, as the evaluators share them: (d, k) -> ids (Q, k), best
# first (EvalContext.neighbours, one exact search per size).
Neighbours = Callable[[int, int], np.ndarray]


def normalized_prefix(x: np.ndarray, d: int) -> np.ndarray:
    """``x[:, :d]`` as contiguous float32 rows of unit L2 norm (zero rows stay zero)."""
    prefix = np.array(x[:, :d], dtype=np.float32, order="C")  # a copy: the input may be a read-only memmap
    # einsum, not np.linalg.norm: the norm would allocate a squared copy of the whole chunk
    norms = np.sqrt(np.einsum("ij,ij->i", prefix, prefix))[:, None]
    prefix /= np.maximum(norms, 1e-12)
    return prefix


def chunk_rows(db_chunk: int, d: int) -> int:
    """Database rows per search chunk: ``db_chunk``, capped so a float32 chunk of ``d`` features fits
    ``CHUNK_BYTES``."""
    return max(1, min(int(db_chunk), CHUNK_BYTES // (4 * max(int(d), 1))))


def _gpu_available() -> bool:
    return hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0


def _search_block(
    db: np.ndarray, queries: np.ndarray, k: int, use_gpu: bool
) -> tuple[np.ndarray, np.ndarray]:
    if use_gpu:  # pragma: no cover - needs faiss-gpu
        res = faiss.StandardGpuResources()
        return faiss.knn_gpu(res, queries, db, k, metric=faiss.METRIC_INNER_PRODUCT)
    return faiss.knn(queries, db, k, metric=faiss.METRIC_INNER_PRODUCT)


def candidates(num_database: int, exclude_self: bool) -> int:
    """How many database items a query can have as neighbours: all, or all but its own."""
    return num_database - 1 if exclude_self else num_database


def leave_self_out(
    ids: np.ndarray, scores: np.ndarray, k: int, first: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` best of each row of a search for ``k + 1`` (or more) neighbours, best first, without
    the query's own database row (query ``first + i`` is database row ``first + i``); a row whose own item
    was not among them (exact ties) drops its last."""
    own = ids == (first + np.arange(len(ids)))[:, None]
    order = np.argsort(own, axis=1, kind="stable")[:, :k]  # own rows move last, the others keep their order
    return np.take_along_axis(ids, order, axis=1), np.take_along_axis(scores, order, axis=1)


def exact_search(
    database: np.ndarray,
    queries: np.ndarray,
    d: int,
    k: int,
    query_chunk: int,
    db_chunk: int,
    use_gpu: bool | None,
    transform: Callable[[np.ndarray], np.ndarray] | None = None,
    exclude_self: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` database rows by cosine similarity of the size-``d`` prefixes, best first.

    ``transform`` (e.g. a PCA projection) is applied to each database and query chunk before the prefix
    is taken, so a transformed database is searched without ever being stored whole. ``use_gpu=None``:
    a GPU index when faiss has a GPU.

    Returns ``(scores, indices)`` of shape ``(len(queries), k)``. ``database`` may be a float16
    memmap: each database chunk (``db_chunk`` rows, at most ``CHUNK_BYTES`` of float32) is converted and
    normalised once, searched by all query chunks, and the per-chunk results are merged, so at most one
    float32 chunk of the database is in memory. ``exclude_self``: query ``i`` is database row ``i``,
    left out of its own neighbours (at most ``len(database) - 1`` of them).
    """
    n = len(database)
    db_chunk = chunk_rows(db_chunk, d)
    wanted = min(int(k), candidates(n, exclude_self))
    k = min(wanted + 1, n) if exclude_self else wanted
    use_gpu = _gpu_available() if use_gpu is None else use_gpu
    nq = len(queries)
    best_scores = np.full((nq, k), -np.inf, dtype=np.float32)
    best_ids = np.full((nq, k), -1, dtype=np.int64)
    prep = transform or (lambda x: x)
    q_norm = [normalized_prefix(prep(queries[s : s + query_chunk]), d) for s in range(0, nq, query_chunk)]
    for start in range(0, n, db_chunk):
        block = normalized_prefix(prep(database[start : start + db_chunk]), d)
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
    stage_progress("exact searches").step(f"last: d={d}, {nq} queries x {n} items")
    if exclude_self:
        best_ids, best_scores = leave_self_out(best_ids, best_scores, wanted)
    return best_scores, best_ids


def knn_predict(neighbor_labels: np.ndarray, k: int, num_classes: int | None = None) -> np.ndarray:
    """Majority vote among the first ``k`` neighbours (rows best first).

    Ties go to the class whose best-ranked member is nearest, so ``k=1`` is exactly 1-NN. The vote
    compares the ``k`` labels with each other (``k * k`` per query) instead of counting into a
    ``(queries, num_classes)`` table, which for 50k queries and 21k classes would take 8 GB;
    ``num_classes`` is accepted for compatibility and not needed.
    """
    labels = np.asarray(neighbor_labels[:, :k])
    nq, kk = labels.shape
    out = np.empty(nq, dtype=labels.dtype)
    step = max(1, (1 << 24) // max(kk * kk, 1))  # bounds the (step, k, k) comparison to 16 MB
    for s in range(0, nq, step):
        block = labels[s : s + step]
        same = block[:, :, None] == block[:, None, :]  # (b, k, k): neighbour j's label == neighbour i's
        counts = same.sum(axis=2)  # votes of neighbour j's class
        first = same.argmax(axis=2)  # rank of the best-ranked neighbour of j's class
        # counts dominate; among equal counts the class met first wins; argmax takes its first member
        best = np.argmax(counts * (kk + 1) - first, axis=1)
        out[s : s + step] = block[np.arange(len(block)), best]
    return out


def knn_accuracy(neighbor_labels: np.ndarray, query_labels: np.ndarray, k: int, num_classes: int) -> float:
    """Fraction of queries whose k-NN majority vote is their label."""
    return float(np.mean(knn_predict(neighbor_labels, k, num_classes) == query_labels))


def check_knn(cfg: Node, p: str) -> None:
    """``knn`` of an mrl-eval config (``p``: the key prefix, ``evaluate.`` under mrl-train)."""
    knn = mapping(cfg.get("knn"), f"{p}knn", f"{p}knn.k=10")
    positive_int(knn, "k", f"{p}knn.", f"{p}knn.k=10")
