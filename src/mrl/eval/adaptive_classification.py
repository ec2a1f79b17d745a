"""Adaptive classification: a cascade over the trained sizes that stops at the first confident one.

A query starts at the smallest size ``d_0``; at size ``d_g`` it stops when its maximum softmax
probability is above the threshold ``t_g`` and otherwise moves to ``d_{g+1}`` (the largest size always
answers). With every threshold 0 the cascade is the smallest size, with every threshold 1 the largest.

Thresholds are chosen by grid search one consecutive pair ``(d_g, d_{g+1})`` at a time, on a calibration
part of the query split: for a target accuracy ``a``, ``t_g`` is the smallest grid value for which the
calibration queries that reach ``d_g`` and stop there (max softmax above ``t_g``) are at least ``a``
accurate; the others move on to ``d_{g+1}``. A higher target therefore sends more queries to larger
sizes. The cascade is measured on the rest of the query split, averaged over several random splits.

* expected size = mean over queries of the size that answered (the storage/bandwidth a query needs);
* total size = mean over queries of the sum of the sizes evaluated on the way (the compute it costs).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mrl.config_checks import Node, is_int, is_number, mapping, positive_int, require


def cascade(conf: np.ndarray, thresholds: Sequence[float]) -> np.ndarray:
    """Index of the size that answers each query: the first ``g`` with ``conf[g] > thresholds[g]``.

    ``conf`` is ``(G, N)`` (max softmax per size), ``thresholds`` has ``G - 1`` entries.
    """
    g = conf.shape[0]
    stops = conf[:-1] > np.asarray(thresholds, dtype=np.float64)[:, None]
    stops = np.concatenate([stops, np.ones((1, conf.shape[1]), dtype=bool)], axis=0)
    return np.argmax(stops, axis=0) if g > 1 else np.zeros(conf.shape[1], dtype=np.int64)


def cascade_stats(
    conf: np.ndarray, correct: np.ndarray, sizes: Sequence[int], thresholds: Sequence[float]
) -> dict[str, float]:
    """Accuracy, expected size and total size of the cascade with ``thresholds``."""
    stop = cascade(conf, thresholds)
    sizes_arr = np.asarray(sizes, dtype=np.float64)
    cumulative = np.cumsum(sizes_arr)
    n = np.arange(conf.shape[1])
    return {
        "accuracy": float(correct[stop, n].mean()),
        "expected_size": float(sizes_arr[stop].mean()),
        "total_size": float(cumulative[stop].mean()),
    }


def fit_thresholds(conf: np.ndarray, correct: np.ndarray, target: float, grid: np.ndarray) -> list[float]:
    """Per consecutive pair, the smallest grid threshold whose stopped queries meet ``target``."""
    g_count, n = conf.shape
    reach = np.ones(n, dtype=bool)
    thresholds = []
    for g in range(g_count - 1):
        c, here = conf[g, reach], correct[g, reach]
        stop = c[None, :] > grid[:, None]  # (T, n): which reaching queries each threshold stops
        stopped = stop.sum(axis=1)
        hits = (stop & here[None, :]).sum(axis=1)
        # a threshold that stops nobody trivially meets the target (everyone moves on)
        ok = np.flatnonzero((stopped == 0) | (hits >= target * stopped - 1e-9))
        t = float(grid[ok[0]]) if ok.size else 1.0
        thresholds.append(t)
        reach &= ~(conf[g] > t)
    return thresholds


def adaptive_classification(
    pred: np.ndarray,
    conf: np.ndarray,
    labels: np.ndarray,
    sizes: Sequence[int],
    targets: Sequence[float] | None,
    num_targets: int,
    calibration_fraction: float,
    num_splits: int,
    grid_size: int,
    seed: int,
) -> list[dict]:
    """The accuracy-vs-size curve: one entry per target accuracy, averaged over random splits.

    ``targets=None``: ``num_targets`` values from the smallest size's accuracy to 1 (the top of the
    curve sends nearly every query to the largest size).
    """
    correct = pred == labels[None, :]
    if targets is None:
        per_size = correct.mean(axis=1)
        targets = np.linspace(per_size[0], 1.0, num_targets).tolist()
    grid = np.linspace(0.0, 1.0, grid_size)
    rng = np.random.default_rng(seed)
    n = conf.shape[1]
    n_cal = min(max(1, round(calibration_fraction * n)), n - 1)
    splits = [rng.permutation(n) for _ in range(num_splits)]
    curve = []
    for target in targets:
        rows, ths = [], []
        for perm in splits:
            cal, rest = perm[:n_cal], perm[n_cal:]
            t = fit_thresholds(conf[:, cal], correct[:, cal], float(target), grid)
            rows.append(cascade_stats(conf[:, rest], correct[:, rest], sizes, t))
            ths.append(t)
        entry = {key: float(np.mean([r[key] for r in rows])) for key in rows[0]}
        entry["accuracy_std"] = float(np.std([r["accuracy"] for r in rows]))
        entry["target_accuracy"] = float(target)
        entry["thresholds"] = [float(v) for v in np.mean(ths, axis=0)] if ths[0] else []
        curve.append(entry)
    return curve


def check_adaptive_classification(cfg: Node, p: str) -> None:
    """``adaptive_classification`` of an mrl-eval config (``p``: the key prefix, ``evaluate.`` under
    mrl-train's ``evaluate=``)."""
    q = f"{p}adaptive_classification."
    ac = mapping(cfg.get("adaptive_classification"), f"{p}adaptive_classification", "{}")
    targets = ac.get("targets")
    if targets is not None:
        ok = (
            isinstance(targets, list | tuple)
            and bool(targets)
            and all(is_number(t) and 0 < t <= 1 for t in targets)
        )
        require(
            ok, f"{q}targets", targets, "a list of accuracies in (0, 1] (or null)", f"{q}targets=[0.8,0.9]"
        )
    positive_int(ac, "num_targets", q, f"{q}num_targets=10")
    positive_int(ac, "num_splits", q, f"{q}num_splits=5")
    if "grid_size" in ac:
        value = ac["grid_size"]
        require(is_int(value) and value >= 2, f"{q}grid_size", value, "an integer >= 2", f"{q}grid_size=101")
    if "calibration_fraction" in ac:
        value = ac["calibration_fraction"]
        require(
            is_number(value) and 0 < value < 1,
            f"{q}calibration_fraction",
            value,
            "a fraction strictly between 0 and 1",
            f"{q}calibration_fraction=0.5",
        )
