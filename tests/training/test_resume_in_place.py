"""Resuming keeps a run's results and place: ``resume=<dir>`` works in ``<dir>`` wherever it now is, a
finished run keeps every result it had, checkpoints are complete or absent, and a run that trained no
step reports nothing."""

from __future__ import annotations

import errno
import resource
import shutil
from pathlib import Path

import pytest
import torch

from support import TINY, read_results, run_command, wandb_run_dirs

RUN = [*TINY, "data.train_size=256", "head.nesting=[4,8,16]", "backbone.embed_dim=16", "seed=1"]


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def epoch_of(ckpt: Path) -> int:
    return int(torch.load(ckpt, map_location="cpu", weights_only=True)["epoch"])


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """One finished tiny run with W&B (offline); tests work on copies of it."""
    tmp = tmp_path_factory.mktemp("finished")
    proc = run_command("mrl-train", *RUN, cwd=tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (job,) = sorted((tmp / "logs" / "train" / "runs").glob("*"))
    return job


@pytest.mark.slow
def test_resume_works_in_the_given_directory_and_leaves_the_original_alone(run_cli, finished_run, tmp_path):
    copy = tmp_path / "moved" / "run"
    shutil.copytree(finished_run, copy)
    before = snapshot(finished_run)
    result = run_cli("mrl-train", f"resume={copy}", "trainer.max_epochs=2")
    assert result.returncode == 0, result.output[-3000:]
    assert snapshot(finished_run) == before, "resuming a copy must not write into the original run"
    assert set(read_results(finished_run)) <= set(read_results(copy))
    assert len(wandb_run_dirs(copy)) == 2 and len(wandb_run_dirs(finished_run)) == 1
    assert (
        epoch_of(copy / "checkpoints" / "last.ckpt")
        == epoch_of(finished_run / "checkpoints" / "last.ckpt") + 1
    )
    assert not list(copy.parent.glob("*.ckpt")) and (copy / "checkpoints").is_dir()


@pytest.mark.slow
def test_resuming_a_finished_run_keeps_all_its_results(run_cli):
    trained = run_cli("mrl-train", *RUN)
    assert trained.returncode == 0, trained.output[-3000:]
    (run,) = trained.run_dirs()
    before = read_results(run)
    result = run_cli("mrl-train", f"resume={run}")
    assert result.returncode == 0, result.output[-3000:]
    after = read_results(run)
    assert set(before) <= set(after), f"results lost: {sorted(set(before) - set(after))}"
    # nothing trained: the test of the same best checkpoint gives the same numbers
    assert {k: v for k, v in after.items() if k.startswith("test/")} == pytest.approx(
        {k: v for k, v in before.items() if k.startswith("test/")}
    )


@pytest.mark.slow
def test_resume_reads_the_chosen_checkpoint_once(finished_run, tmp_path, monkeypatch):
    """Picking the checkpoint, checking that it fits the model and Lightning's restoring of the training
    state share one read of the file (in process, counting every open of it)."""
    import builtins
    import io
    import os

    from mrl.cli.resume import resume_config
    from mrl.training.job import train

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    opened = []
    real_open = builtins.open

    def counting_open(file, *args, **kwargs):
        if isinstance(file, str | os.PathLike):
            opened.append(Path(file).resolve())
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", counting_open)
    monkeypatch.setattr(io, "open", counting_open)
    threads = torch.get_num_threads()
    try:
        cfg, chosen = resume_config(run, ["trainer.max_epochs=2"])
        cfg.logger = None  # no W&B run in the test process
        train(cfg, chosen)
    finally:
        torch.set_num_threads(threads)
    assert opened.count(Path(cfg.ckpt_path).resolve()) == 1
    assert chosen.contents is None  # handed to Lightning, not kept
    last = run / "checkpoints" / "last.ckpt"
    assert epoch_of(last) == epoch_of(finished_run / "checkpoints" / "last.ckpt") + 1


@pytest.mark.slow
def test_resume_skips_a_truncated_last_checkpoint_for_the_newest_intact_one(run_cli, finished_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    last = run / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 3])  # what a full disk used to leave
    result = run_cli("mrl-train", f"resume={run}", "trainer.max_epochs=2")
    assert result.returncode == 0, result.output[-3000:]
    (best,) = (run / "checkpoints").glob("epoch000.ckpt")
    assert f"from {best}" in result.stderr and "Skipping a checkpoint that cannot be loaded" in result.output
    assert epoch_of(last) == epoch_of(finished_run / "checkpoints" / "last.ckpt") + 1


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides",
    [
        ["trainer.max_epochs=0"],
        ["+trainer.limit_train_batches=0"],
        ["+trainer.max_steps=0"],
        ["data.train_size=0"],
    ],
    ids=["max_epochs", "limit_train_batches", "max_steps", "no_training_data"],
)
def test_a_run_without_any_training_step_fails_and_writes_no_results(run_main, overrides):
    result = run_main("mrl-train", *RUN, "logger=none", *overrides)
    assert result.returncode != 0 and "Traceback" not in result.output
    assert "without a single optimizer step" in result.stderr
    assert not list((result.log_dir / "train" / "runs").glob("*/results.json"))


def test_zero_loss_weights_are_refused_before_training(run_main):
    result = run_main("mrl-train", *RUN, "logger=none", "head.weights=[0,0,0]")
    assert result.returncode != 0 and "Traceback" not in result.output
    # the pre-flight check refuses it before anything is written; the model builder would too
    assert "head.weights=[0, 0, 0]" in result.stderr and "not all 0" in result.stderr
    assert not list((result.log_dir / "train" / "runs").glob("*/checkpoints"))


def test_a_checkpoint_write_that_fails_leaves_the_previous_file_whole(tmp_path, monkeypatch):
    """A full disk in the middle of a checkpoint: the old last.ckpt stays loadable, no partial file, and
    the error says which file, why, and which checkpoint is kept."""
    from mrl.errors import MRLError
    from mrl.training.checkpoint_io import AtomicCheckpointIO
    from mrl.training.checkpoints import load_checkpoint

    path = tmp_path / "checkpoints" / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "epoch": 0}, path)

    def disk_full(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(MRLError, match=r"No space left on device .* last.ckpt, is kept"):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}, "epoch": 1}, path)
    assert load_checkpoint(path)["epoch"] == 0
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]


@pytest.mark.slow
def test_a_checkpoint_that_does_not_fit_on_the_disk_stops_the_run_with_one_paragraph(run_main, tmp_path):
    job = tmp_path / "job"
    first = run_main("mrl-train", *TINY, "logger=none", f"hydra.run.dir={job}")
    assert first.returncode == 0, first.output[-3000:]
    checkpoints, config = snapshot(job / "checkpoints"), (job / "resolved_config.yaml").read_bytes()
    epochs = epoch_of(job / "checkpoints" / "last.ckpt")
    # Files may not grow past 1 MB (writes fail with EFBIG, as they fail with ENOSPC on a full disk): the
    # run's small files are written, its checkpoints (2.5 MB) are not.
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (2**20, hard))
    try:
        full = run_main("mrl-train", f"resume={job}", "trainer.max_epochs=2")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert full.returncode != 0
    assert "Traceback" not in full.output, full.output[-3000:]
    for text in ("Cannot write the checkpoint", "File too large", "is kept", f"mrl-train resume={job}"):
        assert text in full.output, full.output[-3000:]
    assert snapshot(job / "checkpoints") == checkpoints  # no partial or temporary file
    assert (job / "resolved_config.yaml").read_bytes() == config  # still the config of those checkpoints

    # With room again the run goes on; resume= writes into the run, never into MRL_LOG_DIR (here a file)
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("")
    again = run_main("mrl-train", f"resume={job}", "trainer.max_epochs=2", env={"MRL_LOG_DIR": str(blocker)})
    assert again.returncode == 0, again.output[-3000:]
    assert epoch_of(job / "checkpoints" / "last.ckpt") == epochs + 1
