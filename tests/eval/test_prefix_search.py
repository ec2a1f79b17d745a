"""Every size's exact search from one pass (mrl.eval.prefix_search) against references written here: a
plain per-size cosine search in float64, and faiss's per-size flat search (mrl.eval.knn.exact_search)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mrl.eval.knn import exact_search
from mrl.eval.prefix_search import search_all_sizes, top_k_lowest_index_first

SIZES = [2, 4, 8, 16]


def reference_search(database: np.ndarray, queries: np.ndarray, d: int, k: int, exclude_self: bool):
    """Cosine of the size-d prefixes in float64, each row ranked by (score descending, index)."""
    db = database[:, :d].astype(np.float64)
    q = queries[:, :d].astype(np.float64)
    db /= np.maximum(np.linalg.norm(db, axis=1, keepdims=True), 1e-12)
    q /= np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
    scores = q @ db.T
    if exclude_self:
        np.fill_diagonal(scores, -np.inf)
    ids = np.array([sorted(range(len(db)), key=lambda j, row=row: (-row[j], j))[:k] for row in scores])
    return np.take_along_axis(scores, ids, 1), ids


def test_top_k_ranks_equal_scores_by_lower_column():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 4, size=(40, 30)).astype(np.float32)  # many ties, across the k-th place too
    for k in (1, 5, 29, 30):
        values, columns = top_k_lowest_index_first(torch.from_numpy(scores), k)
        want = np.array([sorted(range(30), key=lambda j, row=row: (-row[j], j))[:k] for row in scores])
        np.testing.assert_array_equal(columns.numpy(), want)
        np.testing.assert_array_equal(values.numpy(), np.take_along_axis(scores, want, 1))


@pytest.mark.parametrize("exclude_self", [False, True])
@pytest.mark.parametrize(
    ("block_bytes", "chunk_bytes"),
    [(None, None), (8 * 7 * 5, 4 * 16 * 5)],  # all at once; chunks of 5 rows, blocks of 7 queries
    ids=["one_block", "many_chunks"],
)
def test_every_size_equals_its_own_search(exclude_self, block_bytes, chunk_bytes):
    rng = np.random.default_rng(1)
    database = rng.standard_normal((37, 16)).astype(np.float32)
    database[5] = database[30]  # equal scores across chunks: the lower index ranks first
    database[8, :4] = 0  # a zero prefix: cosine 0, not NaN
    queries = database if exclude_self else rng.standard_normal((23, 16)).astype(np.float32)
    found = search_all_sizes(
        database,
        queries,
        SIZES,
        6,
        exclude_self=exclude_self,
        block_bytes=block_bytes,
        chunk_bytes=chunk_bytes,
    )
    assert sorted(found) == SIZES
    for d in SIZES:
        want_scores, want_ids = reference_search(database, queries, d, 6, exclude_self)
        scores, ids = found[d]
        np.testing.assert_array_equal(ids, want_ids)
        np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-6)
        assert ids.dtype == np.int64 and scores.dtype == np.float32


def test_neighbours_equal_faiss_per_size_on_a_float16_memmap(tmp_path):
    rng = np.random.default_rng(2)
    path = tmp_path / "db.npy"
    stored = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(500, 64))
    stored[:] = rng.standard_normal((500, 64))
    stored.flush()
    database = np.load(path, mmap_mode="r")
    queries = rng.standard_normal((40, 64)).astype(np.float32)
    sizes = [8, 16, 32, 64]
    found = search_all_sizes(database, queries, sizes, 10, chunk_bytes=4 * 64 * 96, block_bytes=8 * 96 * 16)
    for d in sizes:
        faiss_scores, faiss_ids = exact_search(database, queries, d, 10, 16, 96, use_gpu=False)
        scores, ids = found[d]
        np.testing.assert_allclose(scores, faiss_scores, rtol=1e-5, atol=1e-5)
        # random float data has no exact ties: the same neighbours in the same order
        np.testing.assert_array_equal(ids, faiss_ids)


def test_k_is_capped_by_the_candidates():
    database = np.eye(4, dtype=np.float32)
    found = search_all_sizes(database, database, [4], 10, exclude_self=True)
    ids = found[4][1]
    assert ids.shape == (4, 3)  # every other item, never the query itself
    assert not (ids == np.arange(4)[:, None]).any()
