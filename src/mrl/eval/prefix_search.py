"""Exact cosine search at every prefix size in one pass over the full-width inner products.

For sizes ``d_1 < ... < d_G`` the inner product of two size-``d_g`` prefixes is the running sum of the
inner products of the segments ``[d_{g-1}, d_g)``, and a prefix's squared norm the running sum of its
segments' squared norms. One pass that multiplies each segment once therefore gives every size's
cosine scores, at about the cost of one full-width search: searching each size on its own costs the sum
of the sizes (about twice the full width for 8, 16, ..., 2048).

It runs in torch, on the GPU when the evaluation has one (a CPU-only faiss build is enough), with the
database streamed in chunks from its (memory-mapped, float16 or float32) embeddings: what is held is
the queries, one database chunk, one block of scores and each size's best ``k`` so far, whatever the
database's size. Scores are float32 (no TF32 or half-precision products), so the neighbours are those
of a per-size exact search (faiss flat) up to ties and float rounding between near-equal scores.

Ties rank the lower database index first (:func:`top_k_lowest_index_first`), as
:func:`mrl.eval.knn.exact_search` and :func:`mrl.eval.sparse_codes.sparse_search` do.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise

import numpy as np
import torch

from mrl.eval.progress import stage_progress

# Working memory of one block of scores (its running sums and the scaled copy the top-k reads), and its
# database rows, by device type: the CPU's block stays in its caches (every size reads and writes it
# a few times), a GPU's is large enough to keep the device busy.
BLOCK_BYTES = {"cpu": 8 << 20, "cuda": 2 << 30}
BLOCK_COLUMNS = {"cpu": 1024, "cuda": 1 << 20}
# Largest database chunk read from the embeddings at once (its float32 copy on the device)
CHUNK_BYTES = {"cpu": 64 << 20, "cuda": 1 << 30}


def top_k_lowest_index_first(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest scores of each row and their columns ``(R, k)``, best first; equal scores rank
    the lower column first, also among the items tied with the k-th score (which of them are kept).

    ``torch.topk`` of ``k + 1`` picks them: where the ``(k+1)``-th score is below the k-th no tie crosses
    the cut, and the kept ones are only reordered; the rare rows where it equals the k-th are picked
    again from every column with that score (lowest columns first).
    """
    count = scores.shape[1]
    values, columns = scores.topk(min(k + 1, count), dim=1)
    # rows to put in order below: those with equal scores among the kept ones, and the rows picked again
    unordered = (values[:, 1:] == values[:, :-1]).any(1)
    if count > k:
        ambiguous = (values[:, k] == values[:, k - 1]).nonzero()[:, 0]
        values, columns = values[:, :k].clone(), columns[:, :k].clone()
        if len(ambiguous):
            rows = scores[ambiguous]
            kth = values[ambiguous, k - 1 : k]
            above, tied = rows > kth, rows == kth
            wanted = k - above.sum(1, keepdim=True)
            chosen = above | (tied & (tied.cumsum(1) <= wanted))
            picked = chosen.nonzero()[:, 1].view(len(ambiguous), k)  # ascending columns per row
            columns[ambiguous] = picked
            values[ambiguous] = rows.gather(1, picked)
            unordered[ambiguous] = True
    # Those rows by column, then stably by score, so equal scores keep the lower column first. A row
    # without equal scores (most rows of real embeddings) is in its one order already: sorting every
    # row twice cost more than the top-k itself.
    tied = unordered.nonzero()[:, 0]
    if len(tied):
        tied_columns, order = columns[tied].sort(dim=1)
        tied_values, order = values[tied].gather(1, order).sort(dim=1, descending=True, stable=True)
        values[tied], columns[tied] = tied_values, tied_columns.gather(1, order)
    return values, columns


def _segment_norms(x: torch.Tensor, bounds: Sequence[int]) -> torch.Tensor:
    """``(R, G)`` inverse L2 norms of every row's size-``bounds[g+1]`` prefix (zero rows: 1e12)."""
    squares = torch.stack([x[:, a:b].pow(2).sum(1) for a, b in pairwise(bounds)], dim=1)
    return squares.cumsum(1).sqrt().clamp_min(1e-12).reciprocal()


def _rows(x: np.ndarray, start: int, stop: int, width: int, device: torch.device) -> torch.Tensor:
    """Rows ``[start, stop)`` of ``x``'s first ``width`` features as float32 on ``device`` (read in
    their stored dtype: a float16 memmap crosses to a GPU at half the bytes); a copy, as the embeddings
    may be a read-only memmap."""
    block = torch.from_numpy(np.array(x[start:stop, :width], order="C"))
    return block.to(device, non_blocking=True).float()


def search_all_sizes(
    database: np.ndarray,
    queries: np.ndarray,
    sizes: Sequence[int],
    k: int,
    device: torch.device | str = "cpu",
    exclude_self: bool = False,
    block_bytes: int | None = None,
    chunk_bytes: int | None = None,
    max_query_rows: int | None = None,
    max_db_rows: int | None = None,
) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Each size's ``(scores, ids)`` ``(Q, k)``: the ``k`` database rows of largest cosine similarity of
    the size-``d`` prefixes, best first, for every ``d`` in ``sizes``, from one pass over the database.

    ``database`` ``(N, D)`` and ``queries`` ``(Q, D)``: embeddings (a memmap is read a chunk at a time).
    ``exclude_self``: query ``i`` is database row ``i`` and is left out of its own neighbours (at most
    ``N - 1`` of them). ``block_bytes`` / ``chunk_bytes``: the working memory of a block of scores and
    the largest database chunk (defaults by device type: :data:`BLOCK_BYTES`, :data:`CHUNK_BYTES`);
    ``max_query_rows`` / ``max_db_rows``: caps on the rows of a block and of a chunk (``chunks.query`` and
    ``chunks.database`` of conf/eval.yaml).
    """
    device = torch.device(device)
    ordered = sorted({int(d) for d in sizes})
    n, nq, width = len(database), len(queries), ordered[-1]
    k = min(int(k), n - 1 if exclude_self else n)
    bounds = [0, *ordered]
    kind = "cuda" if device.type == "cuda" else "cpu"
    db_rows = max(1, min(n, max_db_rows or n, (chunk_bytes or CHUNK_BYTES[kind]) // (4 * width)))
    # a block of scores: q_rows queries x block_cols database rows, two float32 matrices (the running sums
    # and the scaled scores) within the budget
    block_cols = min(db_rows, BLOCK_COLUMNS[kind])
    q_rows = max(1, min(nq, max_query_rows or nq, (block_bytes or BLOCK_BYTES[kind]) // (8 * block_cols)))
    q = _rows(queries, 0, nq, width, device)
    q_inv = _segment_norms(q, bounds)
    best = [
        (
            torch.full((nq, k), -torch.inf, device=device),
            torch.full((nq, k), -1, dtype=torch.long, device=device),
        )
        for _ in ordered
    ]
    for start in range(0, n, db_rows):
        x = _rows(database, start, min(start + db_rows, n), width, device)
        x_inv = _segment_norms(x, bounds)
        # each segment scaled by its size's inverse norm, and each size's change of scale: once a chunk
        # (one contiguous array per segment: the products read it faster than a strided view of one)
        segments = [x[:, a:b] * x_inv[:, g : g + 1] for g, (a, b) in enumerate(pairwise(bounds))]
        rescale = x_inv[:, 1:] / x_inv[:, :-1]
        for q_start in range(0, nq, q_rows):
            rows = slice(q_start, min(q_start + q_rows, nq))
            for col in range(0, len(x), block_cols):
                cols = slice(col, min(col + block_cols, len(x)))
                own = None
                if exclude_self:
                    own = _own_positions(
                        rows.start, rows.stop - rows.start, start + col, cols.stop - col, device
                    )
                _search_block(
                    q[rows],
                    [segment[cols] for segment in segments],
                    rescale[cols],
                    bounds,
                    k,
                    start + col,
                    own,
                    [(kept[rows], ids[rows]) for kept, ids in best],
                )
    stage_progress("exact searches").step(f"all {len(ordered)} sizes: {nq} queries x {n} items")
    out = {}
    for g, d in enumerate(ordered):
        scores, ids = best[g]
        out[d] = ((scores * q_inv[:, g : g + 1]).cpu().numpy(), ids.cpu().numpy())
    return out


def _search_block(
    q: torch.Tensor,
    x: list[torch.Tensor],
    rescale: torch.Tensor,
    bounds: Sequence[int],
    k: int,
    first_id: int,
    own: tuple[torch.Tensor, torch.Tensor] | None,
    best: list[tuple[torch.Tensor, torch.Tensor]],
) -> None:
    """Merge one block of scores (queries ``q`` x database rows ``x``, ids from ``first_id``) into each
    size's best ``(scores, ids)`` so far (views of the queries' rows, updated in place).

    ``x`` holds the rows' segments, segment ``g`` scaled by the inverse norm ``inv_g`` of the rows'
    size-``g`` prefixes, and ``rescale[:, g-1]`` is ``inv_g / inv_{g-1}``: the scores of size ``g``, the
    running sum of the segments' products times ``inv_g``, are those of size ``g - 1`` rescaled plus
    segment ``g``'s product: one pass over the block per size besides the product. (The query's own
    norm scales its whole row: it changes no ranking, so it is applied to the ``k`` kept scores only,
    after the pass.)"""
    scores = q.new_zeros((len(q), len(x[0])))
    for g, (a, b) in enumerate(pairwise(bounds)):
        if g > 0:
            scores.mul_(rescale[:, g - 1])
        scores.addmm_(q[:, a:b], x[g].T)
        if own is not None and g == 0:  # -inf stays -inf through the rescales and later products
            scores[own] = -torch.inf
        kept_scores, kept_ids = best[g]
        # A row's candidates are its scores above its k-th best so far (an equal one never displaces a
        # kept item, whose index is lower). Only the rows with one need this block's top k (after the
        # first blocks, few when k is small), and it reaches no further than the most any row has: a few
        # columns, not k, once the kept scores are good.
        above = (scores > kept_scores[:, -1:]).sum(1)
        most = int(above.max())
        if most == 0:
            continue
        has = above > 0
        live = None if bool(has.all()) else has.nonzero()[:, 0]
        rows = _rows_of(live)
        values, columns = top_k_lowest_index_first(rows(scores), min(k, most))
        # the kept ids are all lower than this block's: listed first, they win ties
        merged_scores = torch.cat([rows(kept_scores), values], 1)
        merged_ids = torch.cat([rows(kept_ids), columns + first_id], 1)
        values, picked = top_k_lowest_index_first(merged_scores, k)
        if live is None:  # every row (views of the best so far: written in place)
            kept_scores.copy_(values)
            kept_ids.copy_(merged_ids.gather(1, picked))
        else:
            kept_scores[live] = values
            kept_ids[live] = merged_ids.gather(1, picked)


def _rows_of(live: torch.Tensor | None):
    """Selects the ``live`` rows of a tensor; every row, uncopied, for ``None``."""
    return (lambda t: t) if live is None else (lambda t: t[live])


def _own_positions(
    q_start: int, q_count: int, db_start: int, db_count: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """The (row, column) positions of a block of scores where query ``q_start + i`` meets its own
    database row (query ``i`` is database row ``i``)."""
    first, last = max(q_start, db_start), min(q_start + q_count, db_start + db_count)
    items = torch.arange(first, max(first, last), device=device)
    return items - q_start, items - db_start
