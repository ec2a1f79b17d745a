"""``mrl-eval`` on a CSR model (``head=csr``): its size-``k`` representation is the code of the ``k``
largest units of the stored embedding ``z`` (the code of its largest ``k``), not a prefix.

- **Similarity.** Codes are compared by cosine: each size-``k`` code is L2-normalised *after* its top-k
  is taken, then ranked by inner product, exactly as prefixes are normalised after truncation
  (:mod:`mrl.eval.knn`). CSR's own ImageNet 1-NN code does the same (``faiss.normalize_L2`` on the
  codes, then an exact L2 index, which ranks unit vectors as cosine does), and it keeps the codes'
  numbers comparable with the prefixes' beside them in ``mrl-report``. Unnormalised inner products
  would rank database codes with large activations first whatever their direction.
- **Search.** An exact sparse inner product (:func:`mrl.eval.sparse_codes.sparse_search`): scipy CSR
  on the CPU, torch's sparse CSR product on the GPU when the evaluation runs on one; never a dense
  ``(N, hidden)`` copy of the codes: the database's stored codes are sorted once, chunk by chunk
  (:func:`~mrl.eval.sparse_codes.top_codes`, shared by every size), and each size's codes built from them
  before the clock starts, like any index; the queries' top-k codes and the search are timed (report.json
  ``sparse_retrieval``, with the device that searched).
- **Storage.** A code is stored as ``k`` values and ``k`` unit indices
  (:func:`~mrl.eval.sparse_codes.sparse_code_bytes`); the ``quantized`` stage measures it with float32
  and float16 values (the database's values rounded to float16 after normalising; queries stay
  float32, as int8 prefixes quantise only the stored database).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from mrl.errors import MRLError
from mrl.eval.knn import Neighbours, candidates, chunk_rows
from mrl.eval.progress import Progress
from mrl.eval.quantized import ranking_metrics
from mrl.eval.sparse_codes import BYTES_PER_SCORE, TopCodes, sparse_code_bytes, sparse_search, top_k_csr

# how a sparse code's values are stored (the quantized stage's formats for a CSR model)
SPARSE_FORMATS = ("float32", "float16")
# The sparse search's working memory per block of queries (scores and top-k bookkeeping): on the CPU,
# and on a GPU, whose memory holds far larger blocks (fewer passes over the database's codes)
BLOCK_BYTES = 256 * 2**20
DEVICE_BLOCK_BYTES = 2 * 2**30
# What does not apply to sparse codes, and why (report.json "skipped", and the log)
NOT_FOR_CODES = {
    "adaptive_retrieval": (
        "its funnels shortlist and rerank by prefixes z[:, :d], and a sparse code's units have no order: "
        "its size-k view is its top-k code (sparse_retrieval gives the exact sparse search's time)"
    ),
    "baselines": (
        "SVD and truncation reduce a dense embedding to its first d (principal) features; a code's first "
        "units are arbitrary ones: evaluate the source model for these baselines"
    ),
}
PREFIX_FORMATS_SKIPPED = (
    "int8 and binary quantise dense prefixes; a sparse code is stored as k values and k unit indices, "
    "measured with float32 and float16 values instead"
)


def code_search(
    database: TopCodes,
    queries: np.ndarray,
    code_k: int,
    k: int,
    db_chunk: int,
    query_chunk: int,
    value_dtype: str,
    exclude_self: bool,
    device: torch.device,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Ids ``(Q, k)`` of each query's ``k`` nearest database items by cosine of their size-``code_k``
    codes, best first (ties: lower index first), and what the search measured: ``index_seconds`` (the
    database's size-``code_k`` codes from its sorted units ``database``, the
    :func:`~mrl.eval.sparse_codes.top_codes` of its stored codes that every size shares),
    ``search_seconds`` and ``seconds_per_query`` (the queries' codes and the sparse product, top-k
    included), ``active_units`` (mean non-zeros of a database code, at most ``code_k``) and ``device``
    (where the product ran). ``value_dtype``: the database codes' stored values (queries stay float32).
    ``exclude_self``: query ``i`` is database row ``i``, left out of its own neighbours
    (:mod:`mrl.eval.knn`). ``device``: the evaluation's; on a GPU the product runs there, else scipy's
    on the CPU (faster than torch's there: benchmarks/README.md, "Sparse search")."""
    # the stored queries are read in chunks of chunks.database's rows (float32, at most CHUNK_BYTES)
    rows = chunk_rows(db_chunk, queries.shape[1])
    start = time.perf_counter()
    # the index: the database's codes as CSR rows, what the search multiplies each query block by (built
    # before the clock, as a faiss index is for the prefixes' timed searches)
    db = database.csr(code_k, normalize=True, value_dtype=value_dtype)
    built = time.perf_counter()
    q = top_k_csr(queries, code_k, rows, normalize=True, value_dtype="float32")
    on_device = device.type == "cuda"
    budget = DEVICE_BLOCK_BYTES if on_device else BLOCK_BYTES
    n_db = db.shape[0]
    block = min(budget, BYTES_PER_SCORE * n_db * max(1, int(query_chunk)))
    where = device if on_device else None
    ids, _ = sparse_search(q, db, k, block_bytes=block, exclude_self=exclude_self, device=where)
    searched = time.perf_counter() - built
    return ids, {
        "k": int(k),
        "index_seconds": built - start,
        "search_seconds": searched,
        "seconds_per_query": searched / max(len(queries), 1),
        "active_units": db.nnz / max(n_db, 1),
        "device": device.type if on_device else "cpu",
    }


def sparse_quantized(
    database: TopCodes,
    db_labels: np.ndarray,
    queries: np.ndarray,
    query_labels: np.ndarray,
    sizes: Sequence[int],
    k: int,
    chunks: tuple[int, int],
    neighbours: Neighbours,
    exclude_self: bool,
    device: torch.device,
) -> dict[str, dict[int, dict[str, float]]]:
    """``{format: {k_code: {"bytes", "map@k", "1nn"}}}`` of the codes stored with float32 and float16
    values; the float32 rows rank by ``neighbours`` (the shared search), float16 by its own search on
    ``database``'s sorted units. ``chunks``: ``(query, database)`` rows; ``exclude_self``: the queries are
    the database's items; ``device``: the evaluation's (:func:`code_search`)."""
    n_db = len(database.values)
    if k > candidates(n_db, exclude_self):
        raise MRLError(
            f"The database has {candidates(n_db, exclude_self)} items to rank for each query, "
            f"fewer than quantized.k={k}; lower quantized.k."
        )
    hidden = database.hidden
    out: dict[str, dict[int, dict[str, float]]] = {fmt: {} for fmt in SPARSE_FORMATS}
    progress = Progress("quantized sparse searches", len(sizes))
    for d in sizes:
        for fmt in SPARSE_FORMATS:
            if fmt == "float32":
                ids = neighbours(d, k)
            else:
                ids, _ = code_search(database, queries, d, k, chunks[1], chunks[0], fmt, exclude_self, device)
            out[fmt][d] = {"bytes": sparse_code_bytes(d, hidden, fmt)} | ranking_metrics(
                ids, db_labels, query_labels, k
            )
        progress.step(f"k={d}")
    return out


def sparse_retrieval_text(section: dict[str, dict[str, Any]]) -> list[str]:
    """The terminal lines of report.json's ``sparse_retrieval``: per k, the search's time per query."""
    if not section:
        return []
    devices = {row.get("device", "cpu") for row in section.values()}
    on = ", ".join(sorted(devices))
    how = "scipy CSR on the CPU" if devices == {"cpu"} else f"torch sparse CSR on {on}"
    lines = ["", f"sparse retrieval (cosine of top-k codes, {how}):"]
    for d, row in section.items():
        lines.append(
            f"  k={d:<5} {1e3 * row['seconds_per_query']:.3f} ms/query (top {row['k']}), database codes "
            f"built in {row['index_seconds']:.2f}s, {row['active_units']:.1f} active units per code"
        )
    return lines
