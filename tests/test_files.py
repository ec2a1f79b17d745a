"""The one result-file writer: whole files only, and the permissions the umask gives."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

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


def test_a_held_directory_is_refused_until_its_holder_is_killed(tmp_path):
    """One job per directory: while another process holds it, directory_lock refuses naming the holder;
    a holder killed with SIGKILL leaves its lock file but holds nothing."""
    from mrl.files import LOCK_NAME, DirectoryInUse, directory_lock
    from support import directory_held

    job = tmp_path / "job"
    refused = pytest.raises(DirectoryInUse, match="in use by another job \\(a test's holder")
    with directory_held(job), refused, directory_lock(job, "mrl-train"):
        pass
    assert (job / LOCK_NAME).exists()  # what a killed job leaves
    with directory_lock(job, "mrl-train") as held:
        assert held == job
        with directory_lock(job, "mrl-eval"):  # the same process again: re-entrant
            pass
        # still held after the inner block: another process cannot take it, and reads who holds it
        probe = subprocess.run(
            [sys.executable, "-c", PROBE, str(job / LOCK_NAME)], capture_output=True, text=True
        )
        assert probe.stdout.startswith(f"refused: mrl-train, process {os.getpid()} on "), probe.stderr
    assert sorted(p.name for p in job.iterdir()) == []  # the lock file goes with the lock


# Another process asking for the directory (the holding one must never open the lock file itself: closing
# any descriptor of a file drops the process's POSIX locks on it).
PROBE = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
try:
    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    print("taken")
except OSError:
    print("refused: " + os.pread(fd, 1000, 0).decode())
"""


def test_a_directory_the_lock_created_goes_when_left_empty(tmp_path):
    from mrl.files import directory_lock

    with directory_lock(tmp_path / "new" / "job", "mrl-train"):
        assert (tmp_path / "new" / "job").is_dir()
    assert not (tmp_path / "new" / "job").exists()
    with directory_lock(tmp_path / "kept", "mrl-train") as job:
        (job / "results.json").write_text("{}")
    assert sorted(p.name for p in (tmp_path / "kept").iterdir()) == ["results.json"]
