"""Bytes per stored vector and exact sparse retrieval (mrl.eval.sparse_codes): counts by hand, and the
sparse search against a dense search written out here on the same codes."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from mrl.errors import MRLError
from mrl.eval.sparse_codes import (
    TopCodes,
    index_bytes,
    prefix_bytes,
    sparse_code_bytes,
    sparse_search,
    to_csr,
    top_codes,
    top_k_csr,
    top_k_rows,
)
from mrl.nn.sparse_autoencoder import SparseAutoencoder


def dense_search(queries: np.ndarray, database: np.ndarray, k: int):
    """Every score by a dense product, each row sorted by (score descending, index ascending)."""
    scores = queries.astype(np.float64) @ database.astype(np.float64).T
    neighbours = [sorted(range(len(database)), key=lambda j, row=row: (-row[j], j))[:k] for row in scores]
    return np.array(neighbours), np.take_along_axis(scores, np.array(neighbours), 1)


def sparse_integer_codes(rows: int, hidden: int, k: int, seed: int) -> np.ndarray:
    """Codes with k small integer values per row: every product and sum is exact in float32, so dense
    and sparse scores are equal to the bit and ties are real ties."""
    rng = np.random.default_rng(seed)
    codes = np.zeros((rows, hidden), dtype=np.float32)
    for row in codes:
        row[rng.choice(hidden, size=k, replace=False)] = rng.integers(0, 4, size=k)
    return codes


@pytest.mark.parametrize(
    ("hidden", "width"), [(2, 1), (256, 1), (257, 2), (65536, 2), (65537, 4), (2**32, 4)]
)
def test_index_width_is_the_smallest_that_holds_every_unit(hidden, width):
    assert index_bytes(hidden) == width


def test_byte_counts():
    assert [prefix_bytes(64, fmt) for fmt in ("float32", "float16", "int8", "binary")] == [256, 128, 64, 8]
    assert prefix_bytes(12, "binary") == 2  # 12 bits padded to two bytes
    assert sparse_code_bytes(32, 8192) == 32 * 4 + 32 * 2
    assert sparse_code_bytes(8, 256, "float16") == 8 * 2 + 8 * 1
    assert sparse_code_bytes(16, 100_000, "int8") == 16 * 1 + 16 * 4
    with pytest.raises(MRLError, match="Unknown storage format"):
        prefix_bytes(8, "int4")
    with pytest.raises(MRLError, match="Unknown value dtype"):
        sparse_code_bytes(8, 64, "float64")
    with pytest.raises(MRLError, match="wider than 4 bytes"):
        index_bytes(2**32 + 1)


@pytest.fixture(params=[1, 2], ids=["serial", "two_threads"])
def search_threads(request):
    """Blocks searched one after another, or in two threads (one per intra-op thread)."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


# Where the product runs: scipy on the CPU (None), torch's sparse CSR product on the CPU, and on a GPU
SEARCH_DEVICES = [
    None,
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")),
]


@pytest.mark.parametrize("device", SEARCH_DEVICES)
@pytest.mark.parametrize("block_bytes", [1, 16 * 50 * 7, 2**30])  # one query per block, a few, all at once
def test_sparse_search_equals_dense_search_with_ties(block_bytes, search_threads, device):
    queries = sparse_integer_codes(23, 40, 4, seed=0)
    database = sparse_integer_codes(50, 40, 4, seed=1)  # many zero and equal scores: ties decide
    for k in (1, 5, 50):
        neighbours, scores = sparse_search(queries, database, k, block_bytes=block_bytes, device=device)
        want_neighbours, want_scores = dense_search(queries, database, k)
        np.testing.assert_array_equal(neighbours, want_neighbours)
        np.testing.assert_array_equal(scores, want_scores)
        assert neighbours.dtype == np.int64 and scores.dtype == np.float32
        # a CSC database (an index built before a timed search) is searched as it is, with the same result
        csc = sp.csc_matrix(database)
        found = sparse_search(queries, csc, k, block_bytes=block_bytes, device=device)[0]
        np.testing.assert_array_equal(found, neighbours)


@pytest.mark.parametrize("device", SEARCH_DEVICES)
@pytest.mark.parametrize("block_bytes", [1, 16 * 30 * 7, 2**30])  # one query, seven, all at once
def test_sparse_search_leaves_each_item_out_of_its_own_neighbours(block_bytes, search_threads, device):
    items = sparse_integer_codes(30, 40, 4, seed=2)
    scores = items.astype(np.float64) @ items.astype(np.float64).T
    np.fill_diagonal(scores, -np.inf)
    want = np.array([sorted(range(len(items)), key=lambda j, row=row: (-row[j], j))[:5] for row in scores])
    neighbours, found = sparse_search(
        items, items, 5, block_bytes=block_bytes, exclude_self=True, device=device
    )
    np.testing.assert_array_equal(neighbours, want)
    np.testing.assert_array_equal(found, np.take_along_axis(scores, want, 1))


@pytest.mark.parametrize("device", SEARCH_DEVICES)
def test_sparse_search_on_autoencoder_codes_matches_dense_search(device):
    torch.manual_seed(0)
    sae = SparseAutoencoder(16, [4, 8], expansion=4)
    with torch.no_grad():
        queries, database = sae.encode(torch.randn(30, 16), 4), sae.encode(torch.randn(200, 16), 4)
    neighbours, scores = sparse_search(queries, database, 10, device=device)
    want_neighbours, want_scores = dense_search(queries.numpy(), database.numpy(), 10)
    np.testing.assert_array_equal(neighbours, want_neighbours)
    np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-6)


def test_code_conversions_keep_the_non_zeros():
    codes = sparse_integer_codes(6, 20, 3, seed=2)
    matrix = to_csr(codes)
    assert matrix.nnz == np.count_nonzero(codes) and matrix.dtype == np.float32
    np.testing.assert_array_equal(to_csr(torch.from_numpy(codes)).toarray(), codes)
    np.testing.assert_array_equal(to_csr(sp.coo_matrix(codes)).toarray(), codes)
    # codes stored as their k values and units (a row with fewer active units padded with zeros)
    indices = np.argsort(-codes, axis=1, kind="stable")[:, :3].astype(np.int32)
    values = np.take_along_axis(codes, indices, 1)
    from_top_k = TopCodes(values, indices, 20).csr(3, normalize=False)
    np.testing.assert_array_equal(from_top_k.toarray(), codes)
    assert from_top_k.nnz == matrix.nnz  # the zero padding is dropped


def test_top_k_rows_breaks_ties_by_lower_index():
    scores = np.array([[1.0, 3.0, 3.0, 0.0, 3.0], [2.0, 2.0, 2.0, 2.0, 2.0]], dtype=np.float32)
    columns, values = top_k_rows(scores, 2)
    np.testing.assert_array_equal(columns, [[1, 2], [0, 1]])
    np.testing.assert_array_equal(values, [[3.0, 3.0], [2.0, 2.0]])


def test_bad_searches_are_refused():
    codes = sparse_integer_codes(5, 10, 2, seed=3)
    with pytest.raises(MRLError, match="same sparse autoencoder"):
        sparse_search(codes, codes[:, :8], 1)
    with pytest.raises(MRLError, match="between 1 and the database size 5"):
        sparse_search(codes, codes, 6)


def test_one_sorted_pass_gives_every_sizes_codes_with_equal_values_to_the_lower_unit():
    # small integer values: many equal values at every cut, and rows with fewer active units than k
    z = sparse_integer_codes(40, 30, 12, seed=4)
    sorted_once = top_codes(z, 12, rows=7)
    assert sorted_once.units.dtype == np.int32 and sorted_once.width == 12
    for k in (1, 2, 5, 12):
        expected = np.zeros_like(z)
        for row, out in zip(z, expected, strict=True):
            top = np.argsort(-row, kind="stable")[:k]  # largest first, equal values: the lower unit
            out[top] = row[top]
        codes = sorted_once.csr(k, normalize=False)
        np.testing.assert_array_equal(codes.toarray(), expected)
        assert codes.has_sorted_indices and all(np.all(np.diff(r.indices) > 0) for r in codes)
        assert codes.nnz == np.count_nonzero(expected)  # zero values dropped
        # the same codes as sorting for this k alone
        np.testing.assert_array_equal(top_k_csr(z, k, rows=40, normalize=False).toarray(), expected)
    with pytest.raises(MRLError, match="k is 1 to 12, not 13"):
        sorted_once.csr(13)


def test_top_k_csr_keeps_each_rows_top_k_code_normalised_chunk_by_chunk(tmp_path):
    rng = np.random.default_rng(3)
    z = np.maximum(rng.normal(size=(23, 12)), 0).astype(np.float32)
    z[4] = 0  # a row with no active unit stays empty
    path = tmp_path / "z.npy"
    np.save(path, z)
    stored = np.load(path, mmap_mode="r")  # read-only, as mrl-eval's exported embeddings
    for k in (1, 3, 12):
        expected = np.zeros_like(z)
        for row, out in zip(z, expected, strict=True):
            top = np.argsort(-row, kind="stable")[:k]
            out[top] = row[top]
        norms = np.linalg.norm(expected, axis=1, keepdims=True)
        expected = expected / np.maximum(norms, 1e-12)
        codes = top_k_csr(stored, k, rows=5)  # five chunks
        assert codes.shape == (23, 12) and codes.dtype == np.float32
        assert (np.diff(codes.indptr) <= k).all() and codes[4].nnz == 0
        np.testing.assert_allclose(codes.toarray(), expected, rtol=1e-6, atol=1e-7)
        half = top_k_csr(stored, k, rows=50, value_dtype="float16").toarray()
        np.testing.assert_array_equal(half, codes.toarray().astype(np.float16).astype(np.float32))
        raw = top_k_csr(stored, k, rows=50, normalize=False).toarray()
        np.testing.assert_allclose(raw, expected * np.maximum(norms, 1e-12), rtol=1e-6)
    with pytest.raises(MRLError, match="1 to 12 active units"):
        top_k_csr(stored, 13, rows=5)
    with pytest.raises(MRLError, match="float32 or float16"):
        top_k_csr(stored, 2, rows=5, value_dtype="int8")
