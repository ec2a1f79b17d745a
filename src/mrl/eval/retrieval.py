"""Retrieval metrics with relevance = same label, computed as the MRL paper's retrieval code does.

For a query with ranked neighbours ``n_1..n_K`` and ``rel_i = [label(n_i) == label(query)]``:

* ``mAP@k`` = mean over queries of ``sum_{i<=k, rel_i} precision@i / k`` (the paper divides by ``k``,
  not by the number of hits, so numbers compare with its tables);
* ``precision@k`` = ``sum_{i<=k} rel_i / k``;
* ``recall@k`` = ``sum_{i<=k} rel_i / (number of database items of the query's class)`` (the paper
  hard-coded 1300, ImageNet's images per class);
* ``hit@k`` (top-k hit rate) = fraction of queries with at least one relevant item in the top ``k``.

When the queries are the database's own items (``exclude_self``), each query's own item is neither among
its neighbours (:mod:`mrl.eval.knn`) nor counted among its relevant items.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mrl.config_checks import Node, int_list, mapping


def retrieval_metrics(
    neighbor_labels: np.ndarray,
    query_labels: np.ndarray,
    db_labels: np.ndarray,
    ks: Sequence[int],
    exclude_self: bool = False,
) -> dict[str, float]:
    """``map@k``, ``precision@k``, ``recall@k`` and ``hit@k`` for every ``k`` in ``ks``.

    ``neighbor_labels`` is ``(num_queries, >= max(ks))``, best first; vectorised over queries.
    ``exclude_self``: each query is one of the database's items, not relevant to itself.
    """
    matches = neighbor_labels == query_labels[:, None]
    class_sizes = np.bincount(db_labels, minlength=int(max(query_labels.max(), db_labels.max())) + 1)
    others = class_sizes[query_labels] - (1 if exclude_self else 0)
    relevant = np.maximum(others, 1)  # no other item of the query's class in the database: recall 0
    hits_cum = np.cumsum(matches, axis=1)
    precision_at_i = hits_cum / np.arange(1, matches.shape[1] + 1)
    out = {}
    for k in ks:
        if k > matches.shape[1]:
            raise ValueError(f"need {k} neighbours per query, got {matches.shape[1]}")
        hits = hits_cum[:, k - 1]
        ap = (precision_at_i[:, :k] * matches[:, :k]).sum(axis=1) / k
        out[f"map@{k}"] = float(ap.mean())
        out[f"precision@{k}"] = float((hits / k).mean())
        out[f"recall@{k}"] = float((hits / relevant).mean())
        out[f"hit@{k}"] = float((hits > 0).mean())
    return out


def check_retrieval(cfg: Node, p: str) -> None:
    """``retrieval`` of an mrl-eval config (``p``: the key prefix, ``evaluate.`` under mrl-train)."""
    retrieval = mapping(cfg.get("retrieval"), f"{p}retrieval", f"{p}retrieval.ks=[10,100]")
    int_list(retrieval, "ks", f"{p}retrieval.", f"{p}retrieval.ks=[10,25,50,100]")
