"""Crash, resume, requeue and determinism: the real `mrl-train` command on tiny data."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import fault_injection
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
    return fault_injection.tests_on_pythonpath(env)  # the runs load fault_injection's callbacks


class Run:
    """An ``mrl-train`` process started by :func:`start`: its own process group (so a kill takes its
    loader workers too), output in a file (a full pipe cannot block it while nobody reads)."""

    def __init__(self, proc: subprocess.Popen, log: Path) -> None:
        self.proc, self.log = proc, log

    @property
    def output(self) -> str:
        return self.log.read_text(errors="replace")


def start(tmp_path: Path, *args: str, env: dict[str, str] | None = None, stop_at: str = "") -> Run:
    """Start ``mrl-train``; ``stop_at="4,8"`` makes it stop itself at those steps (once each, also across
    a resume: see fault_injection.StopAtSteps)."""
    env = dict(env or env_for(tmp_path))
    if stop_at:
        args = (*args, *fault_injection.stop_at(stop_at, tmp_path / "stops"))
    log = tmp_path / f"mrl-train-{len(list(tmp_path.glob('mrl-train-*.log')))}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [str(BIN / "mrl-train"), *args],
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return Run(proc, log)


def wait_until_stopped(run: Run) -> None:
    """Block until the run stops itself (fault_injection.StopAtSteps); fail at once if it ends instead."""
    _, status = os.waitpid(run.proc.pid, os.WUNTRACED)
    if not os.WIFSTOPPED(status):
        run.proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: tell Popen
        raise AssertionError(f"training ended before the step it should stop at:\n{run.output[-3000:]}")


def wandb_services(pid: int) -> list[int]:
    """The W&B service processes (``wandb-core``) that process ``pid`` started (they run in a session
    of their own, so killing the run's process group leaves them)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            name, fields = stat.read_text().rsplit(")", 1)
        except OSError:  # ended meanwhile
            continue
        if int(fields.split()[1]) == pid and name.endswith("(wandb-core"):
            found.append(int(stat.parent.name))
    return found


def alive(pid: int) -> bool:
    """Whether ``pid`` still runs (a zombie whose parent has not reaped it yet does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def kill_run(run: Run) -> None:
    """SIGKILL the run, its loader workers and its W&B service at once, as a node failure would: nothing
    is flushed on the way out. Returns when all of them are gone, so nothing lingers into later tests."""
    services = wandb_services(run.proc.pid)
    for kill, pid in [(os.killpg, run.proc.pid)] + [(os.kill, pid) for pid in services]:
        with contextlib.suppress(ProcessLookupError):  # ended already
            kill(pid, signal.SIGKILL)
    run.proc.wait()
    while any(alive(pid) for pid in services):  # SIGKILL cannot be ignored: this ends
        time.sleep(0.01)


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
    run = start(tmp_path, *args, env=env_for(tmp_path, **slurm), stop_at="4,8")
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
    # A job that hung instead would wait in a collective for the process group's timeout (30 min): the
    # run's 300 s limit (a TimeoutExpired) catches that without timing a job that takes seconds
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
