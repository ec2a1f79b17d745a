"""Crash, resume, requeue and determinism: the real `mrl-train` command on tiny data."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import BIN, TINY, read_results, wandb_history, wandb_run_dirs

pytestmark = pytest.mark.slow


# Tiny Fashion-MNIST (the fixture's 300 images): 240 train / 60 val, 30 steps per epoch, flips on.
def fmnist_args(data_dir: Path) -> list[str]:
    return [
        f"data.data_dir={data_dir}",
        "data.val_size=60",
        "data.batch_size=8",
        "data.eval_batch_size=60",
        "head.nesting=[2,8,256]",
        "trainer.max_epochs=2",
        "trainer.log_every_n_steps=1",
        "trainer.num_sanity_val_steps=0",
        "checkpoint_every_n_steps=4",
        "threads=1",
        "seed=3",
    ]


def env_for(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {
        **os.environ,
        "MRL_LOG_DIR": str(tmp_path / "logs"),
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "HYDRA_FULL_ERROR": "0",
        **extra,
    }
    env.pop("LOCAL_RANK", None)
    return env


def start(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [str(BIN / "mrl-train"), *args],
        cwd=tmp_path,
        env=env or env_for(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def wait_for_checkpoint(proc: subprocess.Popen, ckpt: Path, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not ckpt.is_file():
        assert proc.poll() is None, f"training ended before its first checkpoint:\n{proc.communicate()[0]}"
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.05)


def train_loss_steps(run_dir: Path) -> list[int]:
    """``trainer/global_step`` of every W&B history row carrying ``train/loss``."""
    return [int(row["trainer/global_step"]) for row in wandb_history(run_dir) if "train/loss" in row]


def comparable(results: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in results.items() if k.startswith(("val/", "test/", "train/acc"))}


def test_killed_run_resumes_into_same_wandb_run_and_matches_uninterrupted(
    run_cli, tiny_fashion_mnist, tmp_path
):
    args = fmnist_args(tiny_fashion_mnist)
    reference = run_cli("mrl-train", *args, "hydra.run.dir=ref")
    assert reference.returncode == 0, reference.output[-3000:]
    expected = read_results(tmp_path / "ref")

    run_dir = tmp_path / "crashed"
    proc = start(tmp_path, *args, f"hydra.run.dir={run_dir}")
    wait_for_checkpoint(proc, run_dir / "checkpoints" / "last.ckpt")
    # Frozen right after its first checkpoint (so no later checkpoint can appear), then killed once W&B's
    # own process has written the history that precedes it: with logger.wandb.settings'
    # x_transaction_log_flush_interval=0.25 that takes well under a second; at W&B's default (15 s) the
    # deadline below fails. SIGKILL, not a clean exit: nothing is flushed on the way out.
    proc.send_signal(signal.SIGSTOP)
    try:
        ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
        saved_step = int(ckpt["global_step"])
        assert 0 < saved_step < 60 and saved_step % 30 != 0, f"checkpoint at step {saved_step} not mid-epoch"
        first_wandb = wandb_run_dirs(run_dir)
        assert len(first_wandb) == 1
        deadline = time.monotonic() + 8
        while set(range(saved_step)) - set(train_loss_steps(first_wandb[0])):
            assert time.monotonic() < deadline, "W&B did not write the history before the checkpoint"
            time.sleep(0.25)
    finally:
        proc.send_signal(signal.SIGKILL)  # also when an assertion failed: never leave it stopped
        proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (run_dir / "results.json").exists(), "the run finished before it was killed"
    killed_steps = train_loss_steps(first_wandb[0])

    resumed = run_cli("mrl-train", f"resume={run_dir}")
    assert resumed.returncode == 0, resumed.output[-3000:]
    assert "Resuming" in resumed.output
    got = read_results(run_dir)
    assert comparable(got) == pytest.approx(comparable(expected), abs=1e-6)

    runs = wandb_run_dirs(run_dir)
    assert len(runs) == 2
    ids = {r.name.rsplit("-", 1)[-1] for r in runs}
    assert len(ids) == 1, f"the resumed job must log into the same W&B run: {ids}"
    resumed_steps = train_loss_steps(next(r for r in runs if r != first_wandb[0]))
    # The killed attempt's W&B history holds every step before the checkpoint, the resumed attempt every
    # step from it to the end: one curve, strictly increasing, no step missing or repeated.
    assert [s for s in killed_steps if s < saved_step] == list(range(saved_step)), killed_steps
    assert resumed_steps == list(range(saved_step, 60)), resumed_steps
    curve = [s for s in killed_steps if s < saved_step] + resumed_steps
    assert curve == list(range(60)), curve


def test_seeded_deterministic_runs_give_identical_metrics(run_cli):
    args = [*TINY, "seed=7", "trainer.deterministic=true", "logger=none", "head.nesting=[2,8,256]"]
    first = run_cli("mrl-train", *args, "hydra.run.dir=a")
    second = run_cli("mrl-train", *args, "hydra.run.dir=b")
    assert first.returncode == 0 and second.returncode == 0, first.output[-2000:] + second.output[-2000:]
    a, b = read_results(first.log_dir.parent / "a"), read_results(second.log_dir.parent / "b")
    assert a == b


def test_slurm_preemption_checkpoints_requeues_and_resumes_same_wandb_run(tiny_fashion_mnist, tmp_path):
    """Lightning's SLURM environment: SIGUSR1 saves hpc_ckpt_*.ckpt and calls `scontrol requeue`; the
    requeued job (SLURM_RESTART_COUNT=1, same output dir as submitit re-runs the same job) resumes."""
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    requeue_log = tmp_path / "requeued.txt"
    (fake_bin / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {requeue_log}\n')
    (fake_bin / "scontrol").chmod(0o755)
    slurm = {
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NAME": "mrl",
        "SLURM_NTASKS": "1",
        "SLURM_NTASKS_PER_NODE": "1",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "0",
        "SLURM_NODELIST": "localhost",
        "PATH": f"{fake_bin}:{os.environ['PATH']}",
    }
    run_dir = tmp_path / "slurm_job"
    args = [*fmnist_args(tiny_fashion_mnist), f"hydra.run.dir={run_dir}"]
    proc = start(tmp_path, *args, env=env_for(tmp_path, **slurm))
    # SIGUSR1 must arrive while `trainer.fit` runs: Lightning installs its SLURM handler there, and outside
    # it the signal's default action kills the process. A fixed sleep raced the 60 steps on a quiet host
    # (they took under 3 s), so the signal is sent at a known point instead: when the first step
    # checkpoint (step 4 of 60), which only `fit` writes, appears.
    wait_for_checkpoint(proc, run_dir / "checkpoints" / "last.ckpt")
    proc.send_signal(signal.SIGUSR1)
    deadline = time.monotonic() + 120
    while not list(run_dir.glob("hpc_ckpt_*.ckpt")) or not requeue_log.exists():
        assert proc.poll() is None, proc.communicate()[0]
        assert time.monotonic() < deadline, "no hpc checkpoint after SIGUSR1"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # what SLURM does after the grace period
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (run_dir / "results.json").exists(), "the run finished before it was preempted"
    assert requeue_log.read_text().split() == ["requeue", "4242"]
    hpc = torch.load(next(run_dir.glob("hpc_ckpt_*.ckpt")), map_location="cpu", weights_only=True)
    assert 4 <= int(hpc["global_step"]) < 60, "the hpc checkpoint must be taken mid-training"
    # Training went on between the signal and the kill, so a step checkpoint may be newer than the hpc one:
    # the requeued job continues from whichever holds the latest state.
    saved = [run_dir / "checkpoints" / "last.ckpt", *run_dir.glob("hpc_ckpt_*.ckpt")]
    newest = max(saved, key=lambda path: path.stat().st_mtime_ns)

    requeued = subprocess.run(
        [str(BIN / "mrl-train"), *args],
        cwd=tmp_path,
        env=env_for(tmp_path, **slurm, SLURM_RESTART_COUNT="1"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert requeued.returncode == 0, (requeued.stdout + requeued.stderr)[-3000:]
    assert "Resuming" in requeued.stderr
    assert f"from {newest}" in requeued.stderr, "the requeued job must resume from the newest checkpoint"
    assert list(run_dir.glob("hpc_ckpt_*.ckpt")), "SIGUSR1 must leave Lightning's hpc checkpoint"
    assert (run_dir / "results.json").is_file()
    ids = {r.name.rsplit("-", 1)[-1] for r in wandb_run_dirs(run_dir)}
    assert len(wandb_run_dirs(run_dir)) == 2 and len(ids) == 1


def test_failing_ddp_rank_stops_the_job_with_a_clear_message(run_cli):
    start_time = time.monotonic()
    result = run_cli(
        "mrl-train",
        "trainer=ddp_cpu",
        *TINY,
        "logger=none",
        env={"MRL_TEST_FAULT": "1:1"},
        timeout=300,
    )
    elapsed = time.monotonic() - start_time
    assert result.returncode != 0
    assert "rank 1" in result.output and "injected fault" in result.output, result.output[-3000:]
    assert "DDP" in result.output
    assert elapsed < 150, f"the job took {elapsed:.0f} s to stop"


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-m", "slow", "-x", "-q"]))
