"""Storage and exact retrieval of sparse codes (CSR's top-k codes) beside dense prefixes.

Bytes of one stored vector:

- a dense prefix of ``d`` features: ``float32`` 4 bytes each, ``float16`` 2, ``int8`` 1 (a per-dimension
  scale shared by the whole database is not per vector), ``binary`` one bit each, packed into
  ``ceil(d / 8)`` bytes;
- a sparse code with ``k`` active units out of ``hidden``: a fixed-width record of ``k`` values (at the
  value dtype) and ``k`` unit indices at the smallest unsigned width that holds ``hidden - 1``: 1 byte up
  to 256 units, 2 up to 65,536, else 4. A row with fewer than ``k`` positive units (ReLU zeros) is
  padded to ``k``, as a fixed-width index stores it.

A CSR model's size-``k`` codes are built from its stored embeddings (each row the code of its largest
``k``) without a dense ``(N, hidden)`` copy: :func:`top_codes` sorts each row's largest units once, one
chunk of rows at a time (largest first, equal values: the lower unit first), and
:meth:`TopCodes.csr` makes the size-``k`` codes of every ``k`` up to that width from the first ``k`` of
them: L2-normalised values in a CSR matrix. One pass over the stored embeddings serves every size (at
ImageNet's scale each pass reads gigabytes). :func:`top_k_csr` is the two for one ``k``.

Retrieval ranks database codes by their inner product with each query code, computed as a sparse
matrix product: a block of queries against the whole database at a time, the blocks sized so that
their dense score matrices fit a memory budget, then the top ``k`` of each row. On the CPU the product
is ``scipy.sparse``'s (CSR), as many blocks at once as torch has intra-op threads; on a torch device (a
GPU) it is torch's sparse CSR product there (cuSPARSE), the database's codes moved to the device once.
Equal scores rank the lower database index first, so the result is the same as an exact dense search
with the same order of ties, on either. The caller measures the wall-clock (it owns what counts as the
search).
"""

from __future__ import annotations

import math
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch

from mrl.errors import MRLError
from mrl.eval.prefix_search import top_k_lowest_index_first

# Bytes per stored feature of a dense prefix (binary: one bit, see prefix_bytes)
DENSE_BYTES = {"float32": 4, "float16": 2, "int8": 1}
PREFIX_FORMATS = (*DENSE_BYTES, "binary")
# Bytes of one stored value of a sparse code
VALUE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "int8": 1}
# Bytes of working memory per database item and query of a block: the float32 scores, the selection
# masks and the tie counts of the top-k
BYTES_PER_SCORE = 16


def prefix_bytes(dim: int, fmt: str) -> int:
    """Bytes of one stored size-``dim`` prefix in format ``fmt`` (one of :data:`PREFIX_FORMATS`)."""
    if fmt == "binary":
        return math.ceil(dim / 8)
    if fmt not in DENSE_BYTES:
        raise MRLError(f"Unknown storage format {fmt!r}: one of {', '.join(PREFIX_FORMATS)}.")
    return DENSE_BYTES[fmt] * dim


def index_bytes(hidden: int) -> int:
    """The smallest unsigned integer width (1, 2 or 4 bytes) that holds every unit index of a code
    with ``hidden`` units (``0 .. hidden - 1``)."""
    for width in (1, 2, 4):
        if hidden <= 256**width:
            return width
    raise MRLError(f"A hidden width of {hidden} units needs indices wider than 4 bytes.")


def sparse_code_bytes(k: int, hidden: int, value_dtype: str = "float32") -> int:
    """Bytes of one stored code: ``k`` values at ``value_dtype`` and ``k`` indices of :func:`index_bytes`."""
    if value_dtype not in VALUE_BYTES:
        raise MRLError(
            f"Unknown value dtype {value_dtype!r} for sparse codes: one of {', '.join(VALUE_BYTES)}."
        )
    return k * (VALUE_BYTES[value_dtype] + index_bytes(hidden))


def to_csr(codes: np.ndarray | torch.Tensor | sp.spmatrix | sp.sparray) -> sp.csr_matrix:
    """Codes as a float32 CSR matrix: from a dense array or tensor ``(N, hidden)`` (zeros dropped) or
    any scipy sparse matrix."""
    if sp.issparse(codes):
        return sp.csr_matrix(codes, dtype=np.float32)
    if isinstance(codes, torch.Tensor):
        codes = codes.detach().cpu().float().numpy()
    return sp.csr_matrix(np.asarray(codes, dtype=np.float32))


@dataclass(frozen=True)
class TopCodes:
    """Each stored code's ``width`` largest units, largest first (equal values: the lower unit first):
    ``values`` ``(N, width)`` float32, ReLU'd (zeros where a row has fewer active units), and their
    ``units`` ``(N, width)`` int32, of codes ``hidden`` units wide (:func:`top_codes`)."""

    values: np.ndarray
    units: np.ndarray
    hidden: int

    @property
    def width(self) -> int:
        return self.values.shape[1]

    def csr(self, k: int, normalize: bool = True, value_dtype: str = "float32") -> sp.csr_matrix:
        """The size-``k`` codes (the first ``k`` units of each row) as a float32 CSR matrix, zeros
        dropped, unit indices sorted within each row (as cuSPARSE wants them); L2-normalised when
        ``normalize``, and the values rounded to ``value_dtype`` (the stored code's values: ``float32`` or
        ``float16``)."""
        if value_dtype not in ("float32", "float16"):
            raise MRLError(f"Sparse codes are searched with float32 or float16 values, not {value_dtype!r}.")
        if not 1 <= k <= self.width:
            raise MRLError(
                f"These codes keep {self.width} units per row, so k is 1 to {self.width}, not {k}."
            )
        units, order = torch.from_numpy(self.units[:, :k]).sort(dim=1)
        values = torch.from_numpy(self.values[:, :k]).gather(1, order)
        if normalize:
            values /= values.norm(dim=1, keepdim=True).clamp_min(1e-12)
        values = values.numpy().astype(value_dtype).astype(np.float32)
        index = np.int32 if values.size < 2**31 else np.int64
        indptr = np.arange(0, values.size + 1, k, dtype=index)
        matrix = sp.csr_matrix(
            (values.ravel(), units.numpy().ravel().astype(index, copy=False), indptr),
            shape=(len(values), self.hidden),
        )
        matrix.has_sorted_indices = True
        matrix.eliminate_zeros()
        return matrix


def top_codes(embeddings: np.ndarray, width: int, rows: int) -> TopCodes:
    """The ``width`` largest units of every row of ``embeddings`` ``(N, hidden)`` (a memmap is read
    ``rows`` at a time), largest first with equal values in unit order, ReLU'd: :class:`TopCodes`.

    Equal values: the lower unit first, whatever the width, so every size's code is the first ``k`` of
    the same sorted units (torch's own top-k, which the model's classifiers take, may keep another of
    two units with equal values at the cut: codes stored as float16 do have such ties)."""
    hidden = embeddings.shape[1]
    if not 1 <= width <= hidden:
        raise MRLError(f"A code of {hidden} units has 1 to {hidden} active units, not k={width}.")
    values = np.empty((len(embeddings), width), dtype=np.float32)
    units = np.empty((len(embeddings), width), dtype=np.int32)
    rows = max(1, int(rows))
    # Units that are not active (0 after the ReLU) are dropped from the codes, so which of them fill a
    # row with fewer active units does not matter: distinct negative stand-ins (the lower unit the
    # larger) spare the exact tie-breaking its cost on rows of many equal zeros.
    inactive = -1.0 - torch.arange(hidden, dtype=torch.float32)
    for start in range(0, len(embeddings), rows):
        # a copy of one chunk: the embeddings may be a read-only memmap
        chunk = torch.from_numpy(np.array(embeddings[start : start + rows], dtype=np.float32))
        chunk = torch.where(chunk > 0, chunk, inactive)
        top, columns = top_k_lowest_index_first(chunk, width)
        values[start : start + len(chunk)] = top.relu_().numpy()
        units[start : start + len(chunk)] = columns.numpy()
    return TopCodes(values, units, hidden)


def top_k_csr(
    embeddings: np.ndarray,
    k: int,
    rows: int,
    normalize: bool = True,
    value_dtype: str = "float32",
) -> sp.csr_matrix:
    """The size-``k`` codes of ``embeddings`` ``(N, hidden)`` (a memmap is read ``rows`` at a time) as a
    float32 CSR matrix: :func:`top_codes` of width ``k``, then :meth:`TopCodes.csr`."""
    return top_codes(embeddings, k, rows).csr(k, normalize, value_dtype)


def top_k_rows(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` largest scores of each row and their columns ``(Q, k)``, best first; equal scores rank
    the lower column first (the order of an exact search that breaks ties by index): the dense search's
    own selection (:func:`~mrl.eval.prefix_search.top_k_lowest_index_first`) on a numpy block."""
    table = torch.from_numpy(np.ascontiguousarray(scores, dtype=np.float32))
    values, columns = top_k_lowest_index_first(table, k)
    return columns.numpy(), values.numpy()


def sparse_search(
    queries: np.ndarray | torch.Tensor | sp.spmatrix,
    database: np.ndarray | torch.Tensor | sp.spmatrix,
    k: int,
    block_bytes: int = 256 * 2**20,
    exclude_self: bool = False,
    device: torch.device | str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product search of sparse codes: the ``k`` best database rows of every query as
    ``(neighbours (Q, k) int64, scores (Q, k) float32)``, best first (ties: lower index first).

    Queries are searched in blocks whose working memory together (scores and top-k bookkeeping, about
    :data:`BYTES_PER_SCORE` bytes per query and database row) stays within ``block_bytes``: with
    ``device`` None by scipy on the CPU, in ``torch.get_num_threads()`` threads; given a torch
    ``device``, by torch's sparse product on it (:func:`_device_search`). A float32 CSR ``database`` is
    searched as it is, so a caller that times searches can build it before the clock starts.
    ``exclude_self``: query ``i`` is database row ``i`` (the same items), left out of its own neighbours.
    """
    ready = isinstance(database, sp.csr_matrix | sp.csc_matrix) and database.dtype == np.float32
    queries, database = to_csr(queries), database if ready else to_csr(database)
    if queries.shape[1] != database.shape[1]:
        raise MRLError(
            f"Query codes have {queries.shape[1]} units and database codes {database.shape[1]}: codes "
            "from the same sparse autoencoder are needed."
        )
    n_db = database.shape[0]
    others = n_db - 1 if exclude_self else n_db
    if not 1 <= k <= others:
        what = "the number of other database items" if exclude_self else "the database size"
        raise MRLError(f"Retrieval of the top {k} needs k between 1 and {what} {others}.")
    # Each block of queries is scored as the sparse database times the block's dense codes: the cost is
    # the database's non-zeros times the block's size, and the scores come out as one dense array. (A
    # sparse-by-sparse product builds its nearly full result as a sparse matrix first: several times
    # slower at large k.)
    rows = database.tocsr()  # a no-op for CSR; a CSC database's rows, converted once
    if device is not None:
        return _device_search(queries, rows, k, block_bytes, exclude_self, torch.device(device))
    # Blocks run in threads, one per intra-op thread: scipy's product releases the GIL for most of its
    # work and is single-threaded, so a second thread uses the second core. Each thread holds one
    # block's scores, so the budget is shared among them.
    workers = max(1, torch.get_num_threads())
    block = max(1, block_bytes // (BYTES_PER_SCORE * n_db * workers))
    neighbours = np.empty((queries.shape[0], k), dtype=np.int64)
    scores = np.empty((queries.shape[0], k), dtype=np.float32)

    def search_block(start: int) -> None:
        dense = np.ascontiguousarray((rows @ queries[start : start + block].toarray().T).T)
        if exclude_self:  # each query's own item can never be among its neighbours
            own = np.arange(len(dense))
            dense[own, start + own] = -np.inf
        neighbours[start : start + block], scores[start : start + block] = top_k_rows(dense, k)

    starts = range(0, queries.shape[0], block)
    if workers == 1 or len(starts) == 1:
        for start in starts:
            search_block(start)
    else:
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(search_block, starts))  # list(): a block's exception is raised here
    return neighbours, scores


def _device_search(
    queries: sp.csr_matrix,
    database: sp.csr_matrix,
    k: int,
    block_bytes: int,
    exclude_self: bool,
    device: torch.device,
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`sparse_search` by torch's sparse CSR product on ``device``: the database's codes are
    moved there once; each block of queries goes there as dense codes, is scored against every database
    code and reduced to its top ``k`` there (the dense search's own selection), and only the ``(block,
    k)`` result comes back. One block at a time: the device runs it in parallel."""
    n_db = database.shape[0]
    # int32 unit positions where they fit: half the device memory of int64, and cuSPARSE takes both
    index = torch.int32 if database.nnz < 2**31 else torch.int64
    with warnings.catch_warnings():  # torch flags its sparse CSR tensors as a beta feature
        warnings.simplefilter("ignore", UserWarning)
        codes = torch.sparse_csr_tensor(
            torch.from_numpy(database.indptr).to(device, index),
            torch.from_numpy(database.indices).to(device, index),
            torch.from_numpy(database.data).to(device, torch.float32),
            size=database.shape,
            check_invariants=False,  # scipy's CSR is valid; checking it would read it all again
        )
    block = max(1, block_bytes // (BYTES_PER_SCORE * n_db))
    neighbours = np.empty((queries.shape[0], k), dtype=np.int64)
    scores = np.empty((queries.shape[0], k), dtype=np.float32)
    for start in range(0, queries.shape[0], block):
        dense = torch.from_numpy(queries[start : start + block].toarray()).to(device)
        found = (codes @ dense.T).T.contiguous()  # (block, n_db) scores
        if exclude_self:  # each query's own item can never be among its neighbours
            own = torch.arange(len(found), device=device)
            found[own, start + own] = -torch.inf
        values, columns = top_k_lowest_index_first(found, k)
        neighbours[start : start + block] = columns.cpu().numpy()
        scores[start : start + block] = values.cpu().numpy()
    return neighbours, scores
