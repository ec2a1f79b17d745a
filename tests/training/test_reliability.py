"""Crash, resume, requeue and determinism: the real `mrl-train` command on tiny data."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest
import torch

import fault_injection
from support import (
    TINY,
    alive,
    comparable,
    kill_run,
    read_results,
    run_command,
    start,
    wait_until_stopped,
    wandb_history,
    wandb_run_dirs,
    wandb_services,
)

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


def train_loss_steps(run_dir: Path) -> list[int]:
    """``trainer/global_step`` of every W&B history row carrying ``train/loss``."""
    return [int(row["trainer/global_step"]) for row in wandb_history(run_dir) if "train/loss" in row]


def test_killed_run_resumes_into_same_wandb_run_and_matches_uninterrupted(
    run_cli, tiny_fashion_mnist, tmp_path
):
    args = fmnist_args(tiny_fashion_mnist)
    reference = run_cli("mrl-train", *args, "hydra.run.dir=ref")
    assert reference.returncode == 0, reference.output[-3000:]
    expected = read_results(tmp_path / "ref")

    run_dir = tmp_path / "crashed"
    # The run stops itself at step 6, mid-epoch: its checkpoint of step 4 is written and the metrics of
    # steps 0-5 are handed to W&B's service process (which keeps running). Then the test waits until W&B
    # has written steps 0-3 to the run's file, and kills everything at once with SIGKILL, as a node
    # failure would: only what W&B had written survives. No clock: W&B writes its file every
    # logger.wandb.settings.x_transaction_log_flush_interval (tests/test_configs.py checks it is set).
    run = start(tmp_path, *args, f"hydra.run.dir={run_dir}", stop_at="6")
    try:
        wait_until_stopped(run)
        ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
        saved_step = int(ckpt["global_step"])
        assert saved_step == 4, f"checkpoint at step {saved_step}, not the last multiple of 4 before 6"
        first_wandb = wandb_run_dirs(run_dir)
        assert len(first_wandb) == 1
        services = wandb_services(run.proc.pid)
        assert services, "no W&B service process"
        while set(range(saved_step)) - set(train_loss_steps(first_wandb[0])):
            assert all(alive(pid) for pid in services), "W&B's service ended before writing the history"
            time.sleep(0.25)
    finally:
        kill_run(run)  # also when an assertion failed: never leave it stopped
    assert run.proc.returncode == -signal.SIGKILL
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
    # SIGUSR1 must arrive while `trainer.fit` runs: Lightning installs its SLURM handler there, and outside
    # it the signal's default action kills the process. So the run stops itself at step 4 (inside fit,
    # its first step checkpoint written), gets SIGUSR1 while stopped, and goes on: the handler runs as it
    # continues, saving hpc_ckpt_*.ckpt and calling `scontrol requeue`, before the run stops again at
    # step 8 (its second step checkpoint written), where SLURM's kill after the grace period hits it.
    run = start(tmp_path, *args, env=slurm, stop_at="4,8")
    try:
        wait_until_stopped(run)
        run.proc.send_signal(signal.SIGUSR1)
        run.proc.send_signal(signal.SIGCONT)
        wait_until_stopped(run)
    finally:
        kill_run(run)  # what SLURM does after the grace period
    assert run.proc.returncode == -signal.SIGKILL
    assert "Handling auto-requeue signal" in run.output, run.output[-3000:]
    assert not (run_dir / "results.json").exists(), "the run finished before it was preempted"
    assert requeue_log.read_text().split() == ["requeue", "4242"]
    hpc = torch.load(next(run_dir.glob("hpc_ckpt_*.ckpt")), map_location="cpu", weights_only=True)
    assert int(hpc["global_step"]) == 4, "the hpc checkpoint must be taken where the signal arrived"
    # Training went on between the signal and the kill (to step 8), so the step checkpoint is newer than
    # the hpc one: the requeued job continues from whichever holds the latest state.
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert int(last["global_step"]) == 8
    saved = [run_dir / "checkpoints" / "last.ckpt", *run_dir.glob("hpc_ckpt_*.ckpt")]
    newest = max(saved, key=lambda path: path.stat().st_mtime_ns)
    assert newest.name == "last.ckpt"

    requeued = run_command("mrl-train", *args, cwd=tmp_path, env={**slurm, "SLURM_RESTART_COUNT": "1"})
    assert requeued.returncode == 0, (requeued.stdout + requeued.stderr)[-3000:]
    assert "Resuming" in requeued.stderr
    assert f"from {newest}" in requeued.stderr, "the requeued job must resume from the newest checkpoint"
    assert list(run_dir.glob("hpc_ckpt_*.ckpt")), "SIGUSR1 must leave Lightning's hpc checkpoint"
    assert (run_dir / "results.json").is_file()
    ids = {r.name.rsplit("-", 1)[-1] for r in wandb_run_dirs(run_dir)}
    assert len(wandb_run_dirs(run_dir)) == 2 and len(ids) == 1


def test_failing_ddp_rank_stops_the_job_with_a_clear_message(run_cli):
    # A job that hung instead would wait in a collective for the process group's timeout (30 min): the
    # run's 300 s limit catches that (failing with each process's stack) without timing a job of seconds
    result = run_cli(
        "mrl-train",
        "trainer=ddp_cpu",
        *TINY,
        "logger=none",
        *fault_injection.fault_at(rank=1, step=1),
        timeout=300,
    )
    assert result.returncode != 0
    assert "rank 1" in result.output and "injected fault" in result.output, result.output[-3000:]
    assert "DDP" in result.output


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-m", "slow", "-x", "-q"]))
