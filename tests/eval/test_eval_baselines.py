"""Post-hoc baselines: PCA/SVD against numpy's SVD, the probe, and interpolation sizes."""

from __future__ import annotations

import numpy as np
import pytest

from mrl.eval.baselines import interpolation_sizes, pca_fit, pca_project, posthoc_baselines


def test_pca_matches_numpy_svd():
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(500, 12)) * np.linspace(5, 0.5, 12) + 3).astype(np.float32)
    mean, comps = pca_fit(x, chunk=64)  # several chunks
    centered = x.astype(np.float64) - x.mean(0)
    _, s, vt = np.linalg.svd(centered, full_matrices=False)
    np.testing.assert_allclose(mean, x.mean(0), rtol=1e-6)
    for d in (1, 4, 12):
        ours = pca_project(x, mean, comps, d)
        ref = centered @ vt[:d].T
        # components are defined up to sign
        np.testing.assert_allclose(np.abs(ours), np.abs(ref), rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(
        np.var(pca_project(x, mean, comps, 3), axis=0), (s[:3] ** 2) / len(x), rtol=1e-3
    )


def test_interpolation_sizes():
    assert interpolation_sizes([8, 16, 32, 64]) == [12, 24, 48]
    assert interpolation_sizes([1, 2, 4]) == [3]


def test_probe_baselines_see_informative_directions():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, size=600)
    x = rng.normal(size=(600, 16)).astype(np.float32)
    x[:, 10] += 4 * y  # the class lives in feature 10 only (the largest variance direction)
    out = posthoc_baselines(
        x[:400], y[:400], x[400:], y[400:], [1, 16], [1, 16], max_train=300, max_iter=100, seed=0
    )
    assert out["svd"][1] > 0.9  # PCA's first direction is the informative one
    assert out["slice"][1] < 0.6  # the first feature is noise
    assert out["slice"][16] == pytest.approx(out["svd"][16], abs=0.05)


def test_posthoc_one_nn_equals_brute_force():
    """1-NN after PCA to d and after truncation, against a plain numpy cosine nearest neighbour."""
    import numpy as np

    from mrl.eval.baseline_knn import posthoc_one_nn
    from mrl.eval.baselines import pca_fit, pca_project
    from mrl.eval.knn import exact_search

    rng = np.random.default_rng(1)
    db = rng.normal(size=(400, 12)).astype(np.float32)
    q = rng.normal(size=(60, 12)).astype(np.float32)
    db_y, q_y = rng.integers(0, 4, 400), rng.integers(0, 4, 60)

    def brute(a, b):
        a = a / np.linalg.norm(a, axis=1, keepdims=True)
        b = b / np.linalg.norm(b, axis=1, keepdims=True)
        return float(np.mean(db_y[np.argmax(b @ a.T, axis=1)] == q_y))

    def neighbours(d, k):
        return exact_search(db, q, d, k, 4096, 96, False)[1]

    out = posthoc_one_nn(db, db_y, q, q_y, [2, 5], [3], 4096, 96, neighbours)
    mean, comps = pca_fit(db)
    for d in (2, 5):
        expected = brute(pca_project(db, mean, comps, d), pca_project(q, mean, comps, d))
        assert out["svd_1nn"][d] == expected
    assert out["slice_1nn"][3] == brute(db[:, :3], q[:, :3])


def test_posthoc_one_nn_ranks_slices_by_the_shared_search_and_takes_a_given_pca(monkeypatch):
    """A truncation's 1-NN ranks by the neighbours it is given (the kNN stage's search, shared: its
    1-NN of a k=100 search is the 1-NN here), and a given PCA is not refitted."""
    import numpy as np

    from mrl.eval import baseline_knn
    from mrl.eval.baselines import pca_fit
    from mrl.eval.knn import exact_search, knn_accuracy

    rng = np.random.default_rng(2)
    db = rng.normal(size=(300, 16)).astype(np.float32)
    q = rng.normal(size=(50, 16)).astype(np.float32)
    db_y, q_y = rng.integers(0, 5, 300), rng.integers(0, 5, 50)
    deep = {d: exact_search(db, q, d, 100, 4096, 262_144, use_gpu=False)[1] for d in (4, 8)}
    asked = []

    def neighbours(d, k):  # the kNN stage's k=100 searches, as the evaluation context shares them
        asked.append((d, k))
        return deep[d][:, :k]

    pca = pca_fit(db)
    calls = []
    monkeypatch.setattr(baseline_knn, "pca_fit", lambda *a, **k: calls.append("fit") or pca)
    real = baseline_knn.exact_search
    monkeypatch.setattr(baseline_knn, "exact_search", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    out = baseline_knn.posthoc_one_nn(db, db_y, q, q_y, [4], [4, 8], 4096, 262_144, neighbours, pca=pca)
    assert asked == [(4, 1), (8, 1)]
    assert calls == [4]  # only the SVD search; no PCA fit, no slice searched here
    for d in (4, 8):
        assert out["slice_1nn"][d] == knn_accuracy(db_y[deep[d]], q_y, 1, 5)
        assert out["slice_1nn"][d] == float(
            np.mean(db_y[exact_search(db, q, d, 1, 4096, 96, False)[1][:, 0]] == q_y)
        )
