"""Quantised prefixes: retrieval with each size-d prefix stored as int8 codes or as sign bits, beside
float32, measured as bytes per stored vector against mAP@k and 1-NN (the memory/quality frontier of a
deployed index).

Every format quantises the vector the float32 search compares (``mrl.eval.knn``): the prefix
``z[:, :d]`` L2-normalised *after* truncation, so the only difference from the float32 rows is the
quantisation itself.

* ``int8``: faiss's ``ScalarQuantizer`` ``QT_8bit`` (one byte per feature), each dimension's range the
  [min, max] of the database's normalised prefixes (``RS_minmax``, as faiss trains it and as
  sentence-transformers' ``quantize_embeddings`` calibrates on its corpus). Quantising the normalised
  prefix matters: ranges calibrated on raw prefixes would spend the 256 levels on the vectors' norms,
  which cosine search discards, and inner products of decoded raw vectors would rank by norm as well.
  Search (``IndexScalarQuantizer``, inner product) compares the float32 query with the decoded database
  codes: only the stored database is quantised, and bytes per vector counts what is stored.
* ``binary``: one bit per feature, set where the normalised prefix exceeds a threshold (``zero``: the
  sign, which normalising does not change; ``mean``: each dimension's database mean, calibrated like
  int8's ranges), packed eight per byte and searched by Hamming distance (``IndexBinaryFlat``; equal
  distances rank the lower database index first). A size that is not a multiple of 8 is padded with
  zero bits on both sides, which add nothing to any distance: ``ceil(d / 8)`` bytes.

Exactly equal scores (identical normalised prefixes, e.g. of ReLU features at small d; codes that
coincide; integer Hamming distances) come in each index's own order, so at sizes where many items tie
the formats' numbers also differ by which tied items fill the top k.

The database is read in chunks (``chunk_rows``, as exact search does), so only the codes, the very
thing whose size is reported, are held whole; queries are searched in chunks as well.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import faiss
import numpy as np

from mrl.config_checks import Node, mapping, one_of, positive_int, require
from mrl.errors import MRLError
from mrl.eval.knn import Neighbours, candidates, chunk_rows, knn_accuracy, leave_self_out, normalized_prefix
from mrl.eval.progress import Progress
from mrl.eval.retrieval import retrieval_metrics
from mrl.eval.sparse_codes import prefix_bytes

FLOAT32 = "float32"  # the reference rows: the exact search of mrl.eval.knn, 4 bytes per feature
# the quantised storage formats and binary thresholds (conf/eval.yaml quantized.formats, binary_threshold)
QUANTIZED_FORMATS = ("int8", "binary")
BINARY_THRESHOLDS = ("zero", "mean")


@dataclass(frozen=True)
class QuantizedSettings:
    """``quantized`` of conf/eval.yaml (what each setting does is said there) and the chunk sizes."""

    formats: tuple[str, ...]
    k: int
    binary_threshold: str
    query_chunk: int
    db_chunk: int
    exclude_self: bool = False  # the queries are the database's items: each leaves out its own


def check_quantized(cfg: Node, p: str) -> None:
    """``quantized`` of an mrl-eval config (``p``: the key prefix, ``evaluate.`` under mrl-train's
    ``evaluate=``): distinct known formats (float32 is always the reference), k, binary threshold."""
    q = f"{p}quantized."
    qc = mapping(cfg.get("quantized"), f"{p}quantized", f"{q}k=10")
    if "formats" in qc:
        value = qc["formats"]
        ok = isinstance(value, list | tuple) and bool(value) and len(set(map(str, value))) == len(value)
        require(
            ok and all(v in QUANTIZED_FORMATS for v in value),
            f"{q}formats",
            value,
            f"a list of distinct formats among {', '.join(QUANTIZED_FORMATS)} (float32 is always measured "
            f"as the reference; methods.quantized=false turns the measurement off)",
            f"{q}formats=[int8,binary]",
        )
    positive_int(qc, "k", q, f"{q}k=10")
    one_of(qc, "binary_threshold", q, BINARY_THRESHOLDS)


@dataclass(frozen=True)
class PrefixStats:
    """Per-dimension statistics of the database's normalised size-d prefixes: the calibration."""

    low: np.ndarray
    high: np.ndarray
    mean: np.ndarray


def _blocks(database: np.ndarray, d: int, db_chunk: int):
    """The database's normalised size-``d`` prefixes, one float32 chunk at a time."""
    rows = chunk_rows(db_chunk, d)
    for start in range(0, len(database), rows):
        yield normalized_prefix(database[start : start + rows], d)


def prefix_stats(database: np.ndarray, d: int, db_chunk: int) -> PrefixStats:
    """Min, max and mean of each feature of the normalised size-``d`` prefixes, in one chunked pass."""
    low = np.full(d, np.inf, dtype=np.float32)
    high = np.full(d, -np.inf, dtype=np.float32)
    total = np.zeros(d, dtype=np.float64)
    for block in _blocks(database, d, db_chunk):
        np.minimum(low, block.min(axis=0), out=low)
        np.maximum(high, block.max(axis=0), out=high)
        total += block.sum(axis=0, dtype=np.float64)
    return PrefixStats(low, high, (total / max(len(database), 1)).astype(np.float32))


def int8_index(database: np.ndarray, d: int, stats: PrefixStats, db_chunk: int) -> faiss.Index:
    """A faiss ``IndexScalarQuantizer`` (``QT_8bit``, inner product) of the normalised prefixes."""
    index = faiss.IndexScalarQuantizer(d, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT)
    index.sq.rangestat = faiss.ScalarQuantizer.RS_minmax
    # RS_minmax takes each dimension's min and max over the training rows, so training on the two rows
    # of per-dimension extremes gives the whole database's ranges without holding it in memory
    index.train(np.ascontiguousarray(np.stack([stats.low, stats.high])))
    for block in _blocks(database, d, db_chunk):
        index.add(block)
    return index


def binary_codes(prefix: np.ndarray, threshold: np.ndarray | float) -> np.ndarray:
    """Bits ``prefix > threshold``, packed eight per byte, zero-padded to whole bytes."""
    return np.packbits(prefix > threshold, axis=1)


def binary_index(database: np.ndarray, d: int, threshold: np.ndarray | float, db_chunk: int) -> faiss.Index:
    """A faiss ``IndexBinaryFlat`` (Hamming distance) of the normalised prefixes' bits."""
    index = faiss.IndexBinaryFlat(8 * ((d + 7) // 8))
    for block in _blocks(database, d, db_chunk):
        index.add(binary_codes(block, threshold))
    return index


def quantized_index(
    fmt: str, database: np.ndarray, d: int, stats: PrefixStats | None, settings: QuantizedSettings
) -> tuple[faiss.Index, Callable[[np.ndarray], np.ndarray]]:
    """The index of format ``fmt`` and how a normalised query prefix is encoded to search it."""
    if fmt == "int8":
        return int8_index(database, d, stats, settings.db_chunk), lambda q: q
    threshold = stats.mean if settings.binary_threshold == "mean" else 0.0
    index = binary_index(database, d, threshold, settings.db_chunk)
    return index, lambda q: binary_codes(q, threshold)


def search_index(
    index: faiss.Index,
    encode: Callable[[np.ndarray], np.ndarray],
    queries: np.ndarray,
    d: int,
    k: int,
    query_chunk: int,
    exclude_self: bool = False,
) -> np.ndarray:
    """Ids of the top-``k`` database rows of every query, best first, searched ``query_chunk`` at a time;
    ``exclude_self``: query ``i`` is database row ``i``, left out of its own neighbours."""
    ids = []
    for s in range(0, len(queries), query_chunk):
        encoded = encode(normalized_prefix(queries[s : s + query_chunk], d))
        scores, found = index.search(encoded, min(k + 1, index.ntotal) if exclude_self else k)
        ids.append(leave_self_out(found, scores, k, first=s)[0] if exclude_self else found)
    return np.concatenate(ids) if ids else np.empty((0, k), dtype=np.int64)


def ranking_metrics(
    neighbor_ids: np.ndarray, db_labels: np.ndarray, query_labels: np.ndarray, k: int
) -> dict[str, float]:
    """``map@k`` and ``1nn`` of ranked neighbours, as the retrieval and kNN sections define them."""
    neighbor_labels = db_labels[neighbor_ids]
    return {
        f"map@{k}": retrieval_metrics(neighbor_labels, query_labels, db_labels, [k])[f"map@{k}"],
        "1nn": knn_accuracy(neighbor_labels, query_labels, 1, num_classes=0),  # 1-NN: no class count used
    }


def needs_stats(settings: QuantizedSettings) -> bool:
    """Whether a format of ``settings`` is calibrated on the database (:func:`prefix_stats`)."""
    return "int8" in settings.formats or (
        "binary" in settings.formats and settings.binary_threshold == "mean"
    )


def quantized_retrieval(
    database: np.ndarray,
    db_labels: np.ndarray,
    queries: np.ndarray,
    query_labels: np.ndarray,
    sizes: Sequence[int],
    settings: QuantizedSettings,
    neighbours: Neighbours,
) -> dict[str, dict[int, dict[str, float]]]:
    """``{format: {d: {"bytes", "map@k", "1nn"}}}`` for float32 and every format of ``settings``.

    The float32 rows rank by ``neighbours``, the exact search the kNN and retrieval sections share.
    """
    k = settings.k
    if k > candidates(len(database), settings.exclude_self):
        raise MRLError(
            f"The database has {candidates(len(database), settings.exclude_self)} items to rank for each "
            f"query, fewer than quantized.k={k}; lower quantized.k."
        )
    out: dict[str, dict[int, dict[str, float]]] = {FLOAT32: {}, **{f: {} for f in settings.formats}}
    progress = Progress("quantized searches", len(sizes) * len(settings.formats))
    for d in sizes:
        row = ranking_metrics(neighbours(d, k), db_labels, query_labels, k)
        out[FLOAT32][d] = {"bytes": prefix_bytes(d, FLOAT32), f"map@{k}": row[f"map@{k}"], "1nn": row["1nn"]}
        # the calibration pass only where a format uses it (int8's ranges, binary's mean threshold)
        stats = prefix_stats(database, d, settings.db_chunk) if needs_stats(settings) else None
        for fmt in settings.formats:
            index, encode = quantized_index(fmt, database, d, stats, settings)
            ids = search_index(index, encode, queries, d, k, settings.query_chunk, settings.exclude_self)
            # what the index stores per vector: faiss's code_size, counted where every byte count is
            out[fmt][d] = {"bytes": prefix_bytes(d, fmt), **ranking_metrics(ids, db_labels, query_labels, k)}
            progress.step(f"{fmt} d={d}")
    return out
