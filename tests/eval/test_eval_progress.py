"""Progress lines inside the long mrl-eval stages: throttled by time, naming the loop and how far it got."""

from __future__ import annotations

import logging

import numpy as np

from mrl.eval import progress as progress_module
from mrl.eval.baselines import posthoc_baselines
from mrl.eval.progress import Progress


def test_progress_logs_at_most_once_per_interval(caplog):
    now = [0.0]
    progress = Progress("search", total=5, every_s=10, clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="mrl.eval"):
        logged = []
        for t in (1, 5, 11, 12, 25):
            now[0] = t
            logged.append(progress.step(f"d={t}"))
    assert logged == [False, False, True, False, True]
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["search: 3/5 (d=11) after 11s", "search: 5/5 (d=25) after 25s"]


def test_a_stage_reports_each_size_when_the_interval_is_zero(caplog, monkeypatch):
    monkeypatch.setattr(progress_module, "EVERY_S", 0.0)
    rng = np.random.default_rng(0)
    db, q = rng.normal(size=(60, 8)).astype(np.float32), rng.normal(size=(20, 8)).astype(np.float32)
    db_y, q_y = rng.integers(0, 2, 60), rng.integers(0, 2, 20)
    with caplog.at_level(logging.INFO, logger="mrl.eval"):
        posthoc_baselines(db, db_y, q, q_y, [2, 4], [2, 4, 8], max_train=5000, max_iter=20, seed=0)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("baselines: probes")]
    assert [line.split(" after")[0] for line in lines] == [
        "baselines: probes: 1/5 (svd d=2)",
        "baselines: probes: 2/5 (svd d=4)",
        "baselines: probes: 3/5 (slice d=2)",
        "baselines: probes: 4/5 (slice d=4)",
        "baselines: probes: 5/5 (slice d=8)",
    ]


def test_searches_are_counted_per_stage(caplog, monkeypatch):
    """Exact searches (one pass for the reported sizes, one per other size) count from the start of each
    stage and say which stage they belong to, not a running count over the process."""
    from hydra import compose, initialize_config_dir

    from mrl.config_path import config_dir
    from mrl.eval import evaluators
    from support import tiny_eval_context

    monkeypatch.setattr(progress_module, "EVERY_S", 0.0)
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        overrides = ["methods.adaptive_retrieval=false", "methods.adaptive_classification=false"]
        overrides += ["baselines.knn=true", "baselines.svd=false", "baselines.max_iter=20", "ckpt_path=x"]
        overrides += ["search=one_pass"]
        cfg = compose("eval", overrides=overrides)
    for _ in range(2):  # a second evaluation in the same process starts again too
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="mrl.eval"):
            evaluators.run_evaluators(tiny_eval_context(cfg), cfg, lambda name: None)
        lines = [r.getMessage().split(" (")[0] for r in caplog.records if "exact searches" in r.getMessage()]
        # the kNN stage searches the 4 sizes in one pass; the baselines' 1-NN the untrained slices 3, 6, 12
        assert lines == [
            "knn+retrieval: exact searches: 1",
            *(f"baselines: exact searches: {i}" for i in range(1, 4)),
        ]
