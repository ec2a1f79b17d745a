"""1-NN accuracy of the post-hoc baselines: a standard model's embedding reduced to ``d`` by PCA/SVD or by
plain truncation to its first ``d`` features, searched exactly like the Matryoshka prefixes (cosine
similarity, normalised after reduction), so the comparison table can put 1-NN beside top-1 for every
method, as the paper's Figure 3 does.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import numpy as np

from mrl.eval.baselines import pca_fit, pca_project
from mrl.eval.knn import Neighbours, exact_search, knn_accuracy
from mrl.eval.progress import Progress


def _one_nn(neighbour_ids: np.ndarray, db_labels: np.ndarray, query_labels: np.ndarray) -> float:
    # 1-NN as the kNN section measures it (no class count needed)
    return knn_accuracy(db_labels[neighbour_ids[:, :1]], query_labels, 1, num_classes=0)


def posthoc_one_nn(
    database: np.ndarray,
    db_labels: np.ndarray,
    queries: np.ndarray,
    query_labels: np.ndarray,
    svd_sizes: Sequence[int],
    slice_sizes: Sequence[int],
    query_chunk: int,
    db_chunk: int,
    neighbours: Neighbours,
    pca: tuple[np.ndarray, np.ndarray] | None = None,
    exclude_self: bool = False,
) -> dict[str, dict[int, float]]:
    """``{"svd_1nn": {d: acc}, "slice_1nn": {d: acc}}``: 1-NN accuracy after PCA to ``d`` / truncation.

    The PCA projection is applied to each chunk inside the search; truncation ranks by ``neighbours``,
    the prefixes' exact search the kNN stage shares (a size it searched is not searched again). ``pca``
    is :func:`~mrl.eval.baselines.pca_fit`'s result when the caller already has it. ``exclude_self``: the
    queries are the database's items, each left out of its own neighbours (``neighbours`` does the same).
    """
    chunks = {
        "query_chunk": query_chunk,
        "db_chunk": db_chunk,
        "use_gpu": False,
        "exclude_self": exclude_self,
    }
    out: dict[str, dict[int, float]] = {"svd_1nn": {}, "slice_1nn": {}}
    progress = Progress("baselines: 1-NN searches", len(svd_sizes) + len(slice_sizes))
    if svd_sizes:
        mean, comps = pca if pca is not None else pca_fit(database)
        for d in svd_sizes:
            # projected chunk by chunk inside the search: no N x d copy of the database
            project = partial(pca_project, mean=mean, components=comps, d=int(d))
            _, ids = exact_search(database, queries, int(d), 1, transform=project, **chunks)
            out["svd_1nn"][int(d)] = _one_nn(ids, db_labels, query_labels)
            progress.step(f"svd d={d}")
    for d in slice_sizes:
        out["slice_1nn"][int(d)] = _one_nn(neighbours(int(d), 1), db_labels, query_labels)
        progress.step(f"slice d={d}")
    return out
