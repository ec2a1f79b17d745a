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
bound of the flat search it replaces). Every funnel runs through :meth:`FunnelSearch.run`.

Memory: nothing the size of the database is copied. A flat shortlist is exact search over the
embeddings in chunks (:func:`mrl.eval.knn.exact_search`, the same code and timing as the exact
baseline); reranking gathers only each query's ``k_i`` candidate rows, sliced to ``D_r,i`` and
normalised on the fly (``k_i * D_r,i`` per query, what the MFLOPs formula counts), so a memory-mapped
database is read only where candidates lie. An HNSW shortlist stores its graph and the ``D_s``-prefixes.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import faiss
import numpy as np

from mrl.config_checks import FULL, Node, boolean, int_list, is_int, mapping, positive_int, require
from mrl.errors import MRLError
from mrl.eval.knn import candidates, exact_search, leave_self_out, normalized_prefix
from mrl.eval.progress import Progress
from mrl.eval.retrieval import retrieval_metrics

# Rows normalised and added to an HNSW graph at once. Fixed, not chunks.database: faiss inserts each
# batch's nodes ordered by level, so the batching shapes the graph, and a memory setting must not
# change the results.
HNSW_ADD_ROWS = 262_144

Funnel = tuple[int, Sequence[int], Sequence[int]]  # (D_s, rerank sizes, shortlist lengths)


@dataclass(frozen=True)
class FunnelSettings:
    """How funnels search (conf/eval.yaml ``adaptive_retrieval.hnsw_*`` and ``chunks``): the HNSW graph's
    links per node, build effort and search breadth, and the chunk sizes of the shortlist search
    (query and database rows) and of the rerank (float32 values of candidate rows gathered at once)."""

    hnsw_m: int
    hnsw_ef_construction: int
    hnsw_ef_search: int
    query_chunk: int
    db_chunk: int
    block_floats: int
    # the queries are the database's own items (query i = database row i): each shortlist leaves out the
    # query's own row (mrl.eval.knn), so no stage can rank it
    exclude_self: bool = False


def funnel_mflops(
    num_database: int, shortlist_size: int, rerank_sizes: Sequence[int], shortlists: Sequence[int]
) -> float:
    """MFLOPs per query of a funnel: ``(D_s * N + sum k_i * D_r,i) / 1e6``."""
    flops = shortlist_size * num_database + sum(k * d for k, d in zip(shortlists, rerank_sizes, strict=True))
    return flops / 1e6


def build_hnsw(database: np.ndarray, d: int, m: int, ef_construction: int) -> faiss.IndexHNSWFlat:
    """An HNSW graph (inner product) over the normalised size-``d`` prefixes of ``database``."""
    index = faiss.IndexHNSWFlat(d, m, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = ef_construction
    for start in range(0, len(database), HNSW_ADD_ROWS):
        index.add(normalized_prefix(database[start : start + HNSW_ADD_ROWS], d))
    return index


class FunnelIndex:
    """What a funnel deployment keeps besides the embeddings: nothing for a flat shortlist (exact search
    over the ``D_s``-prefixes of the embeddings), an HNSW graph over them with ``hnsw``. Build it once,
    before any query is timed."""

    def __init__(
        self, database: np.ndarray, shortlist_size: int, hnsw: bool, settings: FunnelSettings
    ) -> None:
        self.database = database
        self.shortlist_size = int(shortlist_size)
        self.size = len(database)
        self.settings = settings
        self.graph = (
            build_hnsw(database, self.shortlist_size, settings.hnsw_m, settings.hnsw_ef_construction)
            if hnsw
            else None
        )

    @property
    def hnsw(self) -> bool:
        return self.graph is not None

    def shortlist(self, queries: np.ndarray, k: int) -> np.ndarray:
        """The ``k`` best database indices per query by cosine similarity of the ``D_s``-prefixes
        (exact when flat, approximate with HNSW), best first, shape ``(num_queries, k)``."""
        own = self.settings.exclude_self
        k, chunk = min(int(k), candidates(self.size, own)), self.settings.query_chunk
        if self.graph is None:
            return exact_search(
                self.database,
                queries,
                self.shortlist_size,
                k,
                chunk,
                self.settings.db_chunk,
                use_gpu=False,
                exclude_self=own,
            )[1]
        searched = min(k + 1, self.size) if own else k
        self.graph.hnsw.efSearch = max(int(self.settings.hnsw_ef_search), searched)
        out = []
        for start in range(0, len(queries), chunk):  # batched: faiss searches a batch in parallel
            scores, cand = self.graph.search(
                normalized_prefix(queries[start : start + chunk], self.shortlist_size), searched
            )
            if own:
                cand = leave_self_out(cand, scores, k, first=start)[0]
            # HNSW may find fewer than k (-1): fill those slots with an item it did find
            out.append(np.where(cand < 0, cand.max(axis=1, keepdims=True), cand))
        return np.concatenate(out, axis=0)


def rerank(
    database: np.ndarray, queries: np.ndarray, candidates: np.ndarray, d: int, keep: int, block_floats: int
) -> np.ndarray:
    """Reorder each query's ``candidates`` (database row indices, ``(num_queries, k)``) by cosine
    similarity of the size-``d`` prefixes; keep the best ``keep``.

    Only the candidate rows are gathered from ``database`` (raw embeddings, a memmap is fine) and
    normalised after truncation: score = <row[:d], q[:d] / |q[:d]|> / |row[:d]|, both reductions by
    einsum, so nothing but the gathered block is allocated. Queries are taken in blocks of at most
    ``block_floats`` gathered values (``chunks.rerank``).
    """
    nq, k = candidates.shape
    keep = min(int(keep), k)
    out = np.empty((nq, keep), dtype=np.int64)
    step = max(1, int(block_floats) // max(k * int(d), 1))
    for start in range(0, nq, step):
        cand = candidates[start : start + step]
        q = normalized_prefix(queries[start : start + step], d)  # (b, d)
        rows = np.asarray(database[cand, :d], dtype=np.float32)  # (b, k, d): only the candidates' pages
        norms = np.sqrt(np.einsum("bkd,bkd->bk", rows, rows))
        scores = np.einsum("bkd,bd->bk", rows, q) / np.maximum(norms, 1e-12)  # (b, k)
        order = np.argsort(-scores, axis=1, kind="stable")[:, :keep]
        out[start : start + step] = np.take_along_axis(cand, order, axis=1)
    return out


def rerank_stages(
    database: np.ndarray,
    queries: np.ndarray,
    candidates: np.ndarray,
    rerank_sizes: Sequence[int],
    shortlists: Sequence[int],
    block_floats: int,
) -> np.ndarray:
    """The funnel after its shortlist: stage ``i`` reranks at ``rerank_sizes[i]`` and keeps
    ``shortlists[i + 1]`` (the last stage keeps ``shortlists[-1]``)."""
    cand = candidates
    for i, d in enumerate(rerank_sizes):
        keep = shortlists[i + 1] if i + 1 < len(shortlists) else shortlists[i]
        cand = rerank(database, queries, cand, int(d), int(keep), block_floats)
    return cand


class FunnelSearch:
    """The funnels of one shortlist size ``D_s`` over ``queries``: the shortlist index (flat or HNSW,
    built here, before any query is timed) and the shortlists searched so far, which funnels with the
    same first length share (its measured time counts in each of them: it is the same work)."""

    def __init__(
        self,
        database: np.ndarray,
        queries: np.ndarray,
        shortlist_size: int,
        hnsw: bool,
        settings: FunnelSettings,
    ) -> None:
        self.index = FunnelIndex(database, shortlist_size, hnsw, settings)
        self.queries = queries
        self.block_floats = settings.block_floats
        self._shortlisted: dict[int, tuple[np.ndarray, float]] = {}

    def run(self, rerank_sizes: Sequence[int], shortlists: Sequence[int]) -> tuple[np.ndarray, float]:
        """Final ranked database indices ``(num_queries, shortlists[-1])`` of the funnel, and the
        seconds its shortlist search and reranking took."""
        if len(rerank_sizes) != len(shortlists) or not shortlists:
            raise ValueError("a funnel needs one shortlist length per rerank size")
        k0 = int(shortlists[0])
        if k0 not in self._shortlisted:
            start = time.perf_counter()
            cand = self.index.shortlist(self.queries, k0)
            self._shortlisted[k0] = (cand, time.perf_counter() - start)
        cand, seconds = self._shortlisted[k0]
        start = time.perf_counter()
        ids = rerank_stages(
            self.index.database, self.queries, cand, rerank_sizes, shortlists, self.block_floats
        )
        return ids, seconds + time.perf_counter() - start


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
    k: int,
    query_chunk: int,
    db_chunk: int,
    exclude_self: bool = False,
) -> dict[str, float]:
    """Exact full-size search: ``map@k``, ``top1``, measured ``seconds_per_query`` and
    ``mflops_per_query`` (``D * N / 1e6``); ``exclude_self``: the queries are the database's items, each
    left out of its own neighbours.

    Timed exactly like a flat funnel shortlist: :func:`~mrl.eval.knn.exact_search` (faiss flat inner
    product, batched queries, CPU, same threads) over database chunks normalised on the fly, so no
    normalised copy of the database is kept. Normalising costs ``N * D`` once for all queries, against
    ``num_queries * N * D`` for the search (0.01% with 10k queries).
    """
    dim = database.shape[1]
    start = time.perf_counter()
    _, ids = exact_search(
        database, queries, dim, k, query_chunk, db_chunk, use_gpu=False, exclude_self=exclude_self
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
    funnels: Sequence[Funnel],
    k: int,
    hnsw: bool,
    settings: FunnelSettings,
) -> list[dict]:
    """Quality (``map@k``, ``top1``), MFLOPs and measured time per query of each funnel
    ``(D_s, rerank_sizes, shortlists)``, with a flat (exact) shortlist and, when ``hnsw``, once more with
    an HNSW shortlist (all flat rows first, each group in ``funnels`` order).

    Indexes are built before the clock starts (as a deployment builds them once); only searching and
    reranking the queries is timed.
    """
    by_size: dict[int, list[int]] = {}
    for i, (shortlist_size, _, _) in enumerate(funnels):
        by_size.setdefault(int(shortlist_size), []).append(i)
    passes = (False, True) if hnsw else (False,)
    progress = Progress("adaptive retrieval: funnels", len(funnels) * len(passes))
    results: list[dict] = []
    for use_hnsw in passes:
        rows: dict[int, dict] = {}
        for shortlist_size, members in by_size.items():
            # one index alive at a time: an HNSW graph holds N x D_s floats plus its links
            search = FunnelSearch(database, queries, shortlist_size, use_hnsw, settings)
            for i in members:
                ids, seconds = search.run(funnels[i][1], funnels[i][2])
                rows[i] = _funnel_row(
                    funnels[i], "hnsw" if use_hnsw else "flat", len(database), seconds / len(queries)
                )
                rows[i].update(_quality(ids, db_labels, query_labels, k))
                progress.step(f"{rows[i]['index']} D_s={shortlist_size}")  # after the timing
            del search
        results += [rows[i] for i in range(len(funnels))]
    return results


def _funnel_row(funnel: Funnel, index: str, num_database: int, seconds_per_query: float) -> dict:
    """A report row's description and cost of ``funnel`` (its quality is added by the caller)."""
    shortlist_size, rerank_sizes, shortlists = funnel
    return {
        "shortlist_size": int(shortlist_size),
        "rerank_sizes": [int(d) for d in rerank_sizes],
        "shortlists": [int(s) for s in shortlists],
        "index": index,
        "mflops_per_query": funnel_mflops(num_database, shortlist_size, rerank_sizes, shortlists),
        "seconds_per_query": seconds_per_query,
    }


def check_adaptive_retrieval(cfg: Node, p: str) -> None:
    """``adaptive_retrieval`` of an mrl-eval config (``p``: the key prefix, ``evaluate.`` under
    mrl-train's ``evaluate=``)."""
    q = f"{p}adaptive_retrieval."
    ar = mapping(cfg.get("adaptive_retrieval"), f"{p}adaptive_retrieval", "{}")
    funnel = ar.get("funnel")
    if funnel:
        funnel = mapping(funnel, f"{q}funnel", f"{q}funnel.shortlist_size=8")
        positive_int(funnel, "shortlist_size", f"{q}funnel.", f"{q}funnel.shortlist_size=8")
        int_list(
            funnel, "rerank_sizes", f"{q}funnel.", f"{q}funnel.rerank_sizes=[16,32,full]", allow_full=True
        )
        int_list(funnel, "shortlists", f"{q}funnel.", f"{q}funnel.shortlists=[200,100,10]")
        rerank, shortlists = funnel.get("rerank_sizes") or [], funnel.get("shortlists") or []
        if len(rerank) != len(shortlists):
            raise MRLError(
                f"{q}funnel.rerank_sizes has {len(rerank)} entries but {q}funnel.shortlists has "
                f"{len(shortlists)}: give one shortlist length per rerank size."
            )
    int_list(ar, "shortlist_sizes", q, f"{q}shortlist_sizes=[8,16,32]")
    positive_int(ar, "shortlist_k", q, f"{q}shortlist_k=200")
    if "rerank_size" in ar:
        value = ar["rerank_size"]
        require(
            (is_int(value) and value > 0) or value == FULL,
            f"{q}rerank_size",
            value,
            "a size or 'full'",
            f"{q}rerank_size=full",
        )
    boolean(ar, "hnsw", q)
    for key in ("hnsw_m", "hnsw_ef_search", "hnsw_ef_construction"):
        positive_int(ar, key, q, f"{q}{key}=40")
