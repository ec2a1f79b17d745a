"""The one result-file writer: whole files only, and the permissions the umask gives."""

from __future__ import annotations

import os
import stat

import pytest

from mrl.files import atomic_path, atomic_write_text, file_mode


@pytest.fixture
def umask():
    """Set the process umask for one test and restore it."""
    old = os.umask(0o022)
    os.umask(old)
    yield lambda mask: os.umask(mask)
    os.umask(old)


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_written_files_get_the_umask_mode(tmp_path, umask, mask, mode):
    umask(mask)
    assert file_mode() == mode
    path = atomic_write_text(tmp_path / "results.json", "{}\n")
    assert stat.S_IMODE(path.stat().st_mode) == mode


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = atomic_write_text(tmp_path / "report.json", "old\n")
    with pytest.raises(RuntimeError), atomic_path(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("disk full")
    assert path.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


@pytest.mark.slow
def test_a_jobs_result_files_are_readable_as_the_umask_allows(run_main, umask):
    """Every file a training job and its evaluation write (results, plots, checkpoints, embeddings,
    model.safetensors) gets the umask's mode: group-readable and -writable under 002."""
    from support import TINY

    umask(0o002)
    result = run_main(
        "mrl-train",
        *TINY,
        "logger=none",
        "head.nesting=[4,8,16]",
        "backbone.embed_dim=16",
        "evaluate={methods: {adaptive_retrieval: false, adaptive_classification: false, baselines: false}}",
    )
    assert result.returncode == 0, result.output[-3000:]
    (job,) = result.run_dirs()
    files = [p for p in job.rglob("*") if p.is_file()]
    names = {p.name for p in files}
    assert {"results.json", "report.json", "model.safetensors", "last.ckpt", "acc_vs_size.png"} <= names
    assert {"train_embeddings.npy", "test_labels.npy", "checkpoint.json"} <= names
    wrong = {str(p.relative_to(job)): oct(stat.S_IMODE(p.stat().st_mode)) for p in files}
    wrong = {k: v for k, v in wrong.items() if v != oct(0o664)}
    assert not wrong, wrong
