"""Adaptive and funnel retrieval: shortlist with a small prefix, rerank the shortlist with larger ones.

A funnel is ``(D_s, [D_r,1 .. D_r,m], [k_1 .. k_m])``: retrieve ``k_1`` candidates with the size-``D_s``
prefix over the whole database, then stage ``i`` reranks its ``k_i`` candidates with the size-``D_r,i``
prefix and keeps ``k_{i+1}`` of them (the last stage keeps all ``k_m``, reordered). The paper's default
is ``D_s=8``, ``D_r = 16, 32, 64, 128, full``, ``k = 200, 100, 50, 25, 10``. Plain adaptive retrieval is
the one-stage funnel ``(D_s, [D_r], [k])``.

Cost per query, as in the paper: ``MFLOPs = (D_s * N + sum_i k_i * D_r,i) / 1e6`` for a database of
``N`` items; ``seconds_per_query`` is measured wall-clock on this machine, beside exact full-size
search run the same way. With ``hnsw=True`` the shortlist comes from a faiss ``IndexHNSWFlat`` over the
size-``D_s`` prefixes (its build time is not counted; its MFLOPs are still the formula's, an upper
bound of the flat search it replaces).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import faiss
import numpy as np

from mrl.eval.knn import normalized_prefix
from mrl.eval.retrieval import retrieval_metrics


def funnel_mflops(
    num_database: int, shortlist_size: int, rerank_sizes: Sequence[int], shortlists: Sequence[int]
) -> float:
    """MFLOPs per query of a funnel: ``(D_s * N + sum k_i * D_r,i) / 1e6``."""
    flops = shortlist_size * num_database + sum(k * d for k, d in zip(shortlists, rerank_sizes, strict=True))
    return flops / 1e6


def build_hnsw(database: np.ndarray, d: int, m: int = 32, ef_construction: int = 200, chunk: int = 262_144):
    """An HNSW graph (inner product) over the normalised size-``d`` prefixes of ``database``."""
    index = faiss.IndexHNSWFlat(d, m, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = ef_construction
    for start in range(0, len(database), chunk):
        index.add(normalized_prefix(database[start : start + chunk], d))
    return index


def build_flat(database: np.ndarray, d: int, chunk: int = 262_144):
    """An exact inner-product index over the normalised size-``d`` prefixes of ``database``."""
    index = faiss.IndexFlatIP(d)
    for start in range(0, len(database), chunk):
        index.add(normalized_prefix(database[start : start + chunk], d))
    return index


class FunnelIndex:
    """What a funnel deployment stores, built once before any query is timed: a shortlist index over the
    size-``D_s`` prefixes (flat or HNSW) and a table of normalised size-``D_r`` prefixes per rerank size."""

    def __init__(
        self,
        database: np.ndarray,
        shortlist_size: int,
        rerank_sizes: Sequence[int],
        hnsw: bool = False,
        hnsw_m: int = 32,
        tables: dict[int, np.ndarray] | None = None,
    ) -> None:
        self.shortlist_size = int(shortlist_size)
        self.size = len(database)
        self.hnsw = hnsw
        self.shortlist = (build_hnsw if hnsw else build_flat)(
            database, self.shortlist_size, *([hnsw_m] if hnsw else [])
        )
        tables = {} if tables is None else tables  # shared between funnels: one table per size
        for d in rerank_sizes:
            if int(d) not in tables:
                tables[int(d)] = normalized_prefix(database, int(d))
        self.tables = tables


def rerank(table: np.ndarray, queries: np.ndarray, candidates: np.ndarray, keep: int) -> np.ndarray:
    """Reorder each query's ``candidates`` by cosine similarity in ``table`` (normalised size-d prefixes);
    keep the best ``keep``."""
    d = table.shape[1]
    q = normalized_prefix(queries, d)  # (B, d)
    rows = np.take(table, candidates.ravel(), axis=0).reshape(*candidates.shape, d)
    scores = np.matmul(rows, q[:, :, None])[..., 0]  # (B, k)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :keep]
    return np.take_along_axis(candidates, order, axis=1)


def funnel_search(
    database: np.ndarray | FunnelIndex,
    queries: np.ndarray,
    shortlist_size: int,
    rerank_sizes: Sequence[int],
    shortlists: Sequence[int],
    query_chunk: int = 1024,
    hnsw_ef_search: int = 256,
) -> np.ndarray:
    """Final ranked database indices ``(num_queries, shortlists[-1])`` of the funnel.

    ``database`` is the embeddings (a flat :class:`FunnelIndex` is built on the fly) or a prebuilt index.
    """
    if len(rerank_sizes) != len(shortlists) or not shortlists:
        raise ValueError("a funnel needs one shortlist length per rerank size")
    index = (
        database if isinstance(database, FunnelIndex) else FunnelIndex(database, shortlist_size, rerank_sizes)
    )
    k0 = min(int(shortlists[0]), index.size)
    if index.hnsw:
        index.shortlist.hnsw.efSearch = max(int(hnsw_ef_search), k0)
    out = []
    for start in range(0, len(queries), query_chunk):
        q = np.asarray(queries[start : start + query_chunk], dtype=np.float32)
        _, cand = index.shortlist.search(normalized_prefix(q, index.shortlist_size), k0)
        if index.hnsw:  # HNSW may find fewer than k0: repeat the last found item
            cand = np.where(cand < 0, cand.max(axis=1, keepdims=True), cand)
        for i, d in enumerate(rerank_sizes):
            keep = shortlists[i + 1] if i + 1 < len(shortlists) else shortlists[i]
            cand = rerank(index.tables[int(d)], q, cand, min(int(keep), cand.shape[1]))
        out.append(cand)
    return np.concatenate(out, axis=0)


def _quality(ids: np.ndarray, db_labels: np.ndarray, query_labels: np.ndarray, k: int) -> dict[str, float]:
    neighbor_labels = db_labels[ids]
    k = min(k, ids.shape[1])
    metrics = retrieval_metrics(neighbor_labels, query_labels, db_labels, [k])
    return {f"map@{k}": metrics[f"map@{k}"], "top1": float(np.mean(neighbor_labels[:, 0] == query_labels))}


def exact_retrieval(
    database: np.ndarray,
    db_labels: np.ndarray,
    queries: np.ndarray,
    query_labels: np.ndarray,
    k: int = 10,
    query_chunk: int = 4096,
) -> dict[str, float]:
    """Exact full-size search (a prebuilt flat index, like the funnels'): ``map@k``, ``top1``, measured
    ``seconds_per_query`` and ``mflops_per_query`` (``D * N / 1e6``)."""
    dim = database.shape[1]
    index = build_flat(database, dim)
    start = time.perf_counter()
    ids = np.concatenate(
        [
            index.search(normalized_prefix(queries[s : s + query_chunk], dim), k)[1]
            for s in range(0, len(queries), query_chunk)
        ]
    )
    seconds = time.perf_counter() - start
    return {
        "seconds_per_query": seconds / len(queries),
        "mflops_per_query": dim * len(database) / 1e6,
        **_quality(ids, db_labels, query_labels, k),
    }


def adaptive_retrieval(
    database: np.ndarray,
    db_labels: np.ndarray,
    queries: np.ndarray,
    query_labels: np.ndarray,
    funnels: Sequence[tuple[int, Sequence[int], Sequence[int]]],
    k: int = 10,
    hnsw: bool = False,
    hnsw_m: int = 32,
    hnsw_ef_search: int = 256,
    query_chunk: int = 1024,
) -> list[dict]:
    """Quality, MFLOPs and measured time per query of each funnel ``(D_s, rerank_sizes, shortlists)``,
    with a flat (exact) shortlist and, when ``hnsw``, once more with an HNSW shortlist.

    Indexes are built before the clock starts (as a deployment builds them once); only searching and
    reranking the queries is timed.
    """
    results = []
    tables: dict[int, np.ndarray] = {}
    for use_hnsw in (False, True) if hnsw else (False,):
        shortlist_indexes: dict[int, FunnelIndex] = {}  # one shortlist index per D_s (HNSW builds slowly)
        for shortlist_size, rerank_sizes, shortlists in funnels:
            if shortlist_size in shortlist_indexes:
                index = shortlist_indexes[shortlist_size]
                for d in rerank_sizes:
                    index.tables.setdefault(int(d), normalized_prefix(database, int(d)))
            else:
                index = FunnelIndex(database, shortlist_size, rerank_sizes, use_hnsw, hnsw_m, tables)
                shortlist_indexes[shortlist_size] = index
            start = time.perf_counter()
            ids = funnel_search(
                index, queries, shortlist_size, rerank_sizes, shortlists, query_chunk, hnsw_ef_search
            )
            seconds = time.perf_counter() - start
            results.append(
                {
                    "shortlist_size": int(shortlist_size),
                    "rerank_sizes": [int(d) for d in rerank_sizes],
                    "shortlists": [int(s) for s in shortlists],
                    "index": "hnsw" if use_hnsw else "flat",
                    "mflops_per_query": funnel_mflops(
                        len(database), shortlist_size, rerank_sizes, shortlists
                    ),
                    "seconds_per_query": seconds / len(queries),
                    **_quality(ids, db_labels, query_labels, k),
                }
            )
    return results
