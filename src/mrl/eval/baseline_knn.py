"""1-NN accuracy of the post-hoc baselines: a standard model's embedding reduced to ``d`` by PCA/SVD or by
plain truncation to its first ``d`` features, searched exactly like the Matryoshka prefixes (cosine
similarity, normalised after reduction), so the comparison table can put 1-NN beside top-1 for every
method, as the paper's Figure 3 does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import partial

import numpy as np

from mrl.eval.baselines import pca_fit, pca_project
from mrl.eval.knn import exact_search
from mrl.eval.progress import Progress


def _one_nn(db: np.ndarray, db_y: np.ndarray, q: np.ndarray, q_y: np.ndarray, d: int, **chunks) -> float:
    _, ids = exact_search(db, q, d, 1, **chunks)
    return float(np.mean(db_y[ids[:, 0]] == q_y))


def posthoc_one_nn(
    database: np.ndarray,
    db_labels: np.ndarray,
    queries: np.ndarray,
    query_labels: np.ndarray,
    svd_sizes: Sequence[int],
    slice_sizes: Sequence[int],
    query_chunk: int,
    db_chunk: int,
    pca: tuple[np.ndarray, np.ndarray] | None = None,
    known_slice_1nn: Mapping[int, float] | None = None,
) -> dict[str, dict[int, float]]:
    """``{"svd_1nn": {d: acc}, "slice_1nn": {d: acc}}``: 1-NN accuracy after PCA to ``d`` / truncation.

    The PCA projection is applied to each chunk inside the search; truncation searches the stored
    embedding's prefixes directly. ``pca`` is :func:`~mrl.eval.baselines.pca_fit`'s result when the
    caller already has it; ``known_slice_1nn`` holds 1-NN accuracies of prefixes that were already
    searched (the kNN stage's, the very same search), which are taken instead of searching again.
    """
    chunks = {"query_chunk": query_chunk, "db_chunk": db_chunk, "use_gpu": False}
    out: dict[str, dict[int, float]] = {"svd_1nn": {}, "slice_1nn": {}}
    known = {int(d): float(v) for d, v in (known_slice_1nn or {}).items()}
    progress = Progress(
        "baselines: 1-NN searches", len(svd_sizes) + len(set(map(int, slice_sizes)) - set(known))
    )
    if svd_sizes:
        mean, comps = pca if pca is not None else pca_fit(database)
        for d in svd_sizes:
            # projected chunk by chunk inside the search: no N x d copy of the database
            project = partial(pca_project, mean=mean, components=comps, d=int(d))
            _, ids = exact_search(database, queries, int(d), 1, transform=project, **chunks)
            out["svd_1nn"][int(d)] = float(np.mean(db_labels[ids[:, 0]] == query_labels))
            progress.step(f"svd d={d}")
    for d in slice_sizes:
        if int(d) in known:
            out["slice_1nn"][int(d)] = known[int(d)]
            continue
        out["slice_1nn"][int(d)] = _one_nn(database, db_labels, queries, query_labels, int(d), **chunks)
        progress.step(f"slice d={d}")
    return out
