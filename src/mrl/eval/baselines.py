"""Post-hoc baselines for any checkpoint: PCA/SVD of the embedding to ``d`` and plain truncation to the
first ``d`` features, each scored by a logistic-regression probe trained on the database embeddings.

For a ``standard`` model these are the paper's SVD and "slicing" baselines; for an MRL model the slices
at sizes that were never trained (12, 24, 48, ... between the nesting sizes) show how well the
representation interpolates.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from itertools import pairwise

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from mrl.config_checks import Node, boolean, int_list, mapping, one_of, positive_int
from mrl.eval.knn import CHUNK_BYTES
from mrl.eval.progress import Progress


def _rows_per_chunk(dim: int, chunk: int | None) -> int:
    # float64 blocks of at most CHUNK_BYTES: the only working copy of the database the PCA makes
    return int(chunk) if chunk else max(1, CHUNK_BYTES // (8 * dim))


def pca_fit(x: np.ndarray, chunk: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``(D,)`` and principal directions ``(D, D)`` (columns, by decreasing variance) of ``x``.

    The covariance is accumulated in float64 chunk by chunk (``chunk`` rows, default: 64 MiB), so a
    memmapped database is read once and never copied whole; the eigendecomposition of a D x D matrix is
    cheap next to that.
    """
    n, dim = x.shape
    chunk = _rows_per_chunk(dim, chunk)
    total = np.zeros(dim)
    gram = np.zeros((dim, dim))
    for start in range(0, n, chunk):
        block = np.asarray(x[start : start + chunk], dtype=np.float64)
        total += block.sum(0)
        gram += block.T @ block
    mean = total / n
    cov = gram / n - np.outer(mean, mean)
    eigvals, eigvecs = np.linalg.eigh(cov)
    return mean, eigvecs[:, np.argsort(eigvals)[::-1]]


def pca_project(
    x: np.ndarray, mean: np.ndarray, components: np.ndarray, d: int, chunk: int | None = None
) -> np.ndarray:
    """Coordinates of ``x`` on the first ``d`` principal directions (float32), computed in float64
    chunks so the only full-length array is the ``(N, d)`` result."""
    basis = components[:, :d]
    out = np.empty((len(x), d), dtype=np.float32)
    chunk = _rows_per_chunk(x.shape[1], chunk)
    for start in range(0, len(x), chunk):
        out[start : start + chunk] = (np.asarray(x[start : start + chunk], dtype=np.float64) - mean) @ basis
    return out


def linear_probe(
    train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray, max_iter: int
) -> float:
    """Top-1 accuracy on ``test`` of a standardised multinomial logistic regression fitted on ``train``."""
    if len(np.unique(train_y)) < 2:
        return float(np.mean(test_y == train_y[0]))
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=max_iter))
    with warnings.catch_warnings():
        # the iteration cap bounds the cost of ~30 probes; a not-quite-converged probe is a fair baseline
        warnings.simplefilter("ignore", ConvergenceWarning)
        probe.fit(np.asarray(train_x, dtype=np.float32), train_y)
    return float(probe.score(np.asarray(test_x, dtype=np.float32), test_y))


def held_out_rows(
    num_database: int, num_queries: int, max_train: int | None, seed: int, held_out: bool
) -> tuple[np.ndarray, np.ndarray | None]:
    """The database rows a probe trains on (at most ``max_train``, a seeded random subset, sorted) and
    the query rows it is tested on (None: all). ``held_out`` (query ``i`` is database row ``i``): at most
    half of the items train and at most ``max_train`` of the rest are tested, so no item is both."""
    rng = np.random.default_rng(seed)
    cap = max_train or num_database
    if held_out:
        cap = min(cap, num_database // 2)
    rows = np.arange(num_database)
    if len(rows) > cap:
        rows = np.sort(rng.choice(rows, size=cap, replace=False))
    if not held_out:
        return rows, None
    rest = np.setdiff1d(np.arange(num_queries), rows)
    if max_train and len(rest) > max_train:
        rest = np.sort(rng.choice(rest, size=max_train, replace=False))
    return rows, rest


def interpolation_sizes(nesting: Sequence[int]) -> list[int]:
    """Untrained sizes between consecutive trained ones: ``1.5 * d`` (12 between 8 and 16, ...)."""
    out = []
    for a, b in pairwise(nesting):
        mid = round(1.5 * a)
        if a < mid < b:
            out.append(mid)
    return out


def posthoc_baselines(
    database: np.ndarray,
    db_labels: np.ndarray,
    queries: np.ndarray,
    query_labels: np.ndarray,
    svd_sizes: Sequence[int],
    slice_sizes: Sequence[int],
    max_train: int | None,
    max_iter: int,
    seed: int,
    pca: tuple[np.ndarray, np.ndarray] | None = None,
    held_out: bool = False,
) -> dict[str, dict[int, float]]:
    """``{"svd": {d: top1}, "slice": {d: top1}}`` of logistic-regression probes.

    The probes train on at most ``max_train`` database items (a seeded random subset), the PCA is
    fitted on the whole database (or given as ``pca``: :func:`pca_fit`'s result, shared with the 1-NN
    baselines). ``held_out``: the queries are the database's items (query ``i`` is database row ``i``),
    so a probe is tested only on items it was not trained on: it trains on at most half of them and is
    tested on at most ``max_train`` of the others (:func:`held_out_rows`).
    """
    rows, test_rows = held_out_rows(len(database), len(queries), max_train, seed, held_out)
    train_x = np.asarray(database[rows], dtype=np.float32)
    train_y = db_labels[rows]
    # no copy of float32 (memmapped) queries when all of them are tested
    test_x = np.asarray(queries if test_rows is None else queries[test_rows], dtype=np.float32)
    query_labels = query_labels if test_rows is None else query_labels[test_rows]
    out: dict[str, dict[int, float]] = {"svd": {}, "slice": {}}
    progress = Progress("baselines: probes", len(svd_sizes) + len(slice_sizes))
    if svd_sizes:
        mean, comps = pca if pca is not None else pca_fit(database)
        for d in svd_sizes:
            out["svd"][int(d)] = linear_probe(
                pca_project(train_x, mean, comps, d),
                train_y,
                pca_project(test_x, mean, comps, d),
                query_labels,
                max_iter,
            )
            progress.step(f"svd d={d}")
    for d in slice_sizes:
        out["slice"][int(d)] = linear_probe(train_x[:, :d], train_y, test_x[:, :d], query_labels, max_iter)
        progress.step(f"slice d={d}")
    return out


def check_baselines(cfg: Node, p: str) -> None:
    """``baselines`` of an mrl-eval config (``p``: the key prefix, ``evaluate.`` under mrl-train's
    ``evaluate=``)."""
    baselines = mapping(cfg.get("baselines"), f"{p}baselines", f"{p}baselines.svd=true")
    one_of(baselines, "models", f"{p}baselines.", ("all", "standard"))
    one_of(baselines, "knn", f"{p}baselines.", (True, False, "auto"))
    for key in ("svd", "interpolation"):
        boolean(baselines, key, f"{p}baselines.")
    int_list(baselines, "sizes", f"{p}baselines.", f"{p}baselines.sizes=[8,16,32]")
    positive_int(baselines, "max_train", f"{p}baselines.", f"{p}baselines.max_train=5000")
    positive_int(baselines, "max_iter", f"{p}baselines.", f"{p}baselines.max_iter=100")
