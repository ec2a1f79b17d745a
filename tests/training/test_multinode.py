"""Several nodes as users launch them, on this machine: 2 "nodes" of 1 CPU process each on the loopback
address (gloo), started by torchrun or by srun (here a stand-in that runs the command once per task with
SLURM's variables, as srun does). One job directory (a shared file system), one results.json; the validation
metrics equal a single process's evaluation of the saved weights; every rank trains on a disjoint part
of the shards each epoch; a run killed on both nodes resumes on both to the uninterrupted run's metrics."""

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

from support import (
    BIN,
    alive,
    command_env,
    comparable,
    free_port,
    read_results,
    recorded_ranks,
    saved_weights_val_accuracy,
    shard_args,
)

pytestmark = pytest.mark.slow

NODES = 2


def job_args(shards: Path, job: Path, seen: Path) -> list[str]:
    """A 2-node DDP job on the shards (1 process a node), writing into ``job``; each rank records what it
    trained on into ``seen``."""
    return [
        *shard_args(shards, workers=1),
        "+data.augment.hflip=0",  # no flip: the same sample in the same epoch is the same image
        "trainer=ddp_cpu",
        "trainer.devices=1",
        f"trainer.num_nodes={NODES}",
        "checkpoint_every_n_steps=2",
        "+callbacks.record._target_=batch_recorder.BatchRecorder",
        f"+callbacks.record.path={seen}",
        f"hydra.run.dir={job}",
    ]


def torchrun(node: int, port: int, cwd: Path, *args: str) -> subprocess.Popen:
    """Node ``node``'s ``torchrun ... mrl-train args``: its own process group, so it can be killed whole."""
    command = [
        str(BIN / "torchrun"),
        f"--nnodes={NODES}",
        "--nproc_per_node=1",
        f"--node_rank={node}",
        "--master_addr=127.0.0.1",
        f"--master_port={port}",
        "--no-python",  # mrl-train is a command, not a script for torchrun's python
        str(BIN / "mrl-train"),
        *args,
    ]
    return launch(command, cwd, cwd / f"node{node}-{time.monotonic_ns()}.log", command_env(cwd / "logs"))


SRUN = """#!{python}
# A stand-in for srun on one machine: the command once per task, with the task's SLURM variables.
import os, subprocess, sys
tasks = int(os.environ["SLURM_NTASKS"])
procs = [
    subprocess.Popen(sys.argv[1:], env={{**os.environ, "SLURM_PROCID": str(t), "SLURM_NODEID": str(t)}})
    for t in range(tasks)
]
sys.exit(max(p.wait() for p in procs))
"""


def srun(port: int, cwd: Path, *command: str) -> subprocess.Popen:
    """``srun <command>`` in a 2-node job with one task a node (Lightning reads each task's rank, world
    and node from SLURM's variables), ``srun`` being a stand-in that starts the tasks here."""
    shim = cwd / "bin" / "srun"
    shim.parent.mkdir(exist_ok=True)
    shim.write_text(SRUN.format(python=sys.executable))
    shim.chmod(0o755)
    slurm = {
        "PATH": os.pathsep.join([str(BIN), os.environ["PATH"]]),  # srun finds mrl-train on the PATH
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NAME": "mrl",
        "SLURM_NTASKS": str(NODES),
        "SLURM_NTASKS_PER_NODE": "1",
        "SLURM_JOB_NUM_NODES": str(NODES),
        "SLURM_NNODES": str(NODES),
        "SLURM_NODELIST": "127.0.0.1",
        "SLURM_LOCALID": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
    }
    return launch([str(shim), *command], cwd, cwd / "srun.log", command_env(cwd / "logs", slurm))


def launch(command: list[str], cwd: Path, log: Path, env: dict[str, str]) -> subprocess.Popen:
    """``command`` in a process group of its own (killed whole), its output in ``log`` (``proc.log``)."""
    with open(log, "w") as out:
        proc = subprocess.Popen(
            command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    proc.log = log
    return proc


def finish(nodes: list[subprocess.Popen], timeout: float = 300) -> None:
    """Wait for every node's command; fail with their logs if one failed or if they have not ended within
    ``timeout`` seconds (then they are killed first: a hung job leaves no processes behind)."""
    deadline = time.monotonic() + timeout
    try:
        for proc in nodes:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        kill(nodes)
        logs = "\n".join(p.log.read_text()[-3000:] for p in nodes)
        pytest.fail(f"the nodes had not ended after {timeout:.0f} s (killed):\n{logs}")
    logs = "\n".join(p.log.read_text()[-3000:] for p in nodes)
    assert all(p.returncode == 0 for p in nodes), logs


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (torchrun starts its workers in sessions of their own)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):  # ended meanwhile
            continue
        children.setdefault(parent, []).append(int(stat.parent.name))
    found, queue = [], [pid]
    while queue:
        below = children.get(queue.pop(), [])
        found += below
        queue += below
    return found


def kill(nodes: list[subprocess.Popen]) -> None:
    """SIGKILL every node's processes at once (the launcher, the trainer, its loader workers), as a node
    failure would; returns when all are gone."""
    doomed = [pid for proc in nodes for pid in (proc.pid, *descendants(proc.pid))]
    for pid in doomed:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for proc in nodes:
        proc.wait()
    while any(alive(pid) for pid in doomed):
        time.sleep(0.01)


def check_job(job: Path, seen: Path) -> None:
    """One run in ``job``: metrics as one process measures them, and disjoint training images per rank."""
    assert (job / "results.json").is_file() and (job / "checkpoints" / "last.ckpt").is_file()
    results = read_results(job)
    accuracies, images = saved_weights_val_accuracy(job, (2, 8, 64))
    assert images == 16
    for d, accuracy in accuracies.items():
        assert results[f"val/acc@{d}"] == pytest.approx(accuracy, abs=1e-6), d
    ranks = recorded_ranks(seen, world=NODES, per_rank=48)  # 96 training images, 2 nodes
    # threads=1 held under DDP (Lightning would give each node's one process all the node's cores)
    assert [rank["threads"] for rank in ranks] == [1] * NODES


def test_torchrun_on_two_nodes_trains_one_run_and_resumes_after_a_kill(tiny_shards, tmp_path):
    job, seen = tmp_path / "job", tmp_path / "seen"
    port = free_port()
    finish([torchrun(node, port, tmp_path, *job_args(tiny_shards, job, seen)) for node in range(NODES)])
    check_job(job, seen)
    assert sorted(p.name for p in tmp_path.glob("logs/**/results.json")) == []  # nothing beside the job dir

    # both nodes killed mid-epoch (each stops itself at step 5, after the step-4 checkpoint), then both
    # resumed from the shared directory: the uninterrupted run's metrics
    crashed, seen_crashed = tmp_path / "crashed", tmp_path / "seen_crashed"
    args = [*job_args(tiny_shards, crashed, seen_crashed), *stop_overrides(tmp_path / "stops")]
    port = free_port()
    nodes = [torchrun(node, port, tmp_path, *args) for node in range(NODES)]
    try:
        wait_for_marker(tmp_path / "stops" / "stopped_at_5", nodes)
        time.sleep(1.0)  # the other node reaches the step's collective and waits there
    finally:
        kill(nodes)
    saved = torch.load(crashed / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert saved["global_step"] == 4, saved["global_step"]
    assert not (crashed / "results.json").exists()
    port = free_port()
    finish([torchrun(node, port, tmp_path, f"resume={crashed}") for node in range(NODES)])
    assert comparable(read_results(crashed)) == pytest.approx(comparable(read_results(job)), abs=1e-6)


def test_slurm_tasks_on_two_nodes_train_one_run(tiny_shards, tmp_path):
    job, seen = tmp_path / "job", tmp_path / "seen"
    port = free_port()
    finish([srun(port, tmp_path, "mrl-train", *job_args(tiny_shards, job, seen))])
    check_job(job, seen)


def stop_overrides(marker_dir: Path) -> list[str]:
    """Each node stops itself (SIGSTOP) at step 5; the first to get there leaves the marker."""
    import fault_injection

    return fault_injection.stop_at("5", marker_dir)


def wait_for_marker(marker: Path, nodes: list[subprocess.Popen], timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not marker.exists():
        ended = [p for p in nodes if p.poll() is not None]
        assert not ended, "\n".join(p.log.read_text()[-3000:] for p in ended)
        assert time.monotonic() < deadline, "no node reached step 5"
        time.sleep(0.1)
