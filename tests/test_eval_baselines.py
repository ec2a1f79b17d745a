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

    rng = np.random.default_rng(1)
    db = rng.normal(size=(400, 12)).astype(np.float32)
    q = rng.normal(size=(60, 12)).astype(np.float32)
    db_y, q_y = rng.integers(0, 4, 400), rng.integers(0, 4, 60)

    def brute(a, b):
        a = a / np.linalg.norm(a, axis=1, keepdims=True)
        b = b / np.linalg.norm(b, axis=1, keepdims=True)
        return float(np.mean(db_y[np.argmax(b @ a.T, axis=1)] == q_y))

    out = posthoc_one_nn(db, db_y, q, q_y, [2, 5], [3], query_chunk=4096, db_chunk=96)
    mean, comps = pca_fit(db)
    for d in (2, 5):
        expected = brute(pca_project(db, mean, comps, d), pca_project(q, mean, comps, d))
        assert out["svd_1nn"][d] == expected
    assert out["slice_1nn"][3] == brute(db[:, :3], q[:, :3])


def test_posthoc_one_nn_takes_known_prefix_results_and_a_given_pca(monkeypatch):
    """Sizes the kNN stage already searched are not searched again, and a given PCA is not refitted;
    the kNN stage's 1-NN (k=100 search) equals this module's own k=1 search of the same prefix."""
    import numpy as np

    from mrl.eval import baseline_knn
    from mrl.eval.baselines import pca_fit
    from mrl.eval.knn import exact_search, knn_accuracy

    rng = np.random.default_rng(2)
    db = rng.normal(size=(300, 16)).astype(np.float32)
    q = rng.normal(size=(50, 16)).astype(np.float32)
    db_y, q_y = rng.integers(0, 5, 300), rng.integers(0, 5, 50)
    _, ids = exact_search(db, q, 8, 100, 4096, 262_144, use_gpu=False)
    knn_stage = knn_accuracy(db_y[ids], q_y, 1, 5)
    searched = baseline_knn.posthoc_one_nn(db, db_y, q, q_y, [], [8], 4096, 262_144)["slice_1nn"][8]
    assert knn_stage == searched

    pca = pca_fit(db)
    calls = []
    monkeypatch.setattr(baseline_knn, "pca_fit", lambda *a, **k: calls.append("fit") or pca)
    real = baseline_knn.exact_search
    monkeypatch.setattr(baseline_knn, "exact_search", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    out = baseline_knn.posthoc_one_nn(
        db, db_y, q, q_y, [4], [4, 8], 4096, 262_144, pca=pca, known_slice_1nn={8: 0.25}
    )
    assert out["slice_1nn"][8] == 0.25  # taken, not searched
    assert calls == [4, 4]  # the SVD search and the size-4 slice search; no PCA fit
