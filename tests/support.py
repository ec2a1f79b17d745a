"""What the tests share: the tiny settings, the one way to run a command (as a process, or its ``main`` in
this one), readers of what a run wrote (results.json, W&B's run files) and small data and reference
writers.

A plain module on the tests' path (as fault_injection.py is): test modules import their helpers from
here, never from one another or from conftest.py, which holds the fixtures.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import logging
import os
import pickle
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path

import numpy as np

import fault_injection
from mrl.tracking.dashboards.keys import leet_inspect

BIN = Path(sys.executable).parent
# Fast, deterministic settings shared by the end-to-end tests: tiny synthetic images and one epoch.
TINY = ["debug=tiny"]  # conf/debug/tiny.yaml: a few seconds on 128 synthetic images


# ---- running the commands ----------------------------------------------------------------------------


@dataclass
class CLIResult:
    """What one command printed and returned; its logs lie under ``log_dir`` (``MRL_LOG_DIR``)."""

    returncode: int
    stdout: str
    stderr: str
    log_dir: Path

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    def run_dirs(self, task: str = "train") -> list[Path]:
        return sorted((self.log_dir / task / "runs").glob("*"))

    def sweep_job_dirs(self, task: str = "train") -> list[Path]:
        sweeps = sorted((self.log_dir / task / "multiruns").glob("*"))
        assert len(sweeps) == 1, sweeps
        return sorted(
            (p for p in sweeps[0].iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name)
        )


def command_env(log_dir: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment a test runs a command in: logs under ``log_dir``, W&B offline and quiet, user
    errors without Hydra's traceback, not a DDP worker, and the test-only callbacks (fault_injection.py,
    batch_recorder.py) loadable in the run and its workers."""
    env = {
        **os.environ,
        "MRL_LOG_DIR": str(log_dir),
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "HYDRA_FULL_ERROR": "0",
        **(extra or {}),
    }
    env.pop("LOCAL_RANK", None)
    return fault_injection.tests_on_pythonpath(env)


def run_command(
    script: str,
    *args: str,
    cwd: Path,
    log_dir: Path | None = None,
    env: dict[str, str] | None = None,
    timeout: int = 600,
) -> CLIResult:
    """Run the console script ``script`` (``mrl-train`` ...) as a process in ``cwd``, logs under
    ``log_dir`` (default ``cwd/logs``); ``env`` adds to :func:`command_env`'s variables."""
    log_dir = log_dir or cwd / "logs"
    # its own process group: a command that outlives ``timeout`` is stopped with everything it started
    # (DDP ranks, loader workers), after each Python process printed where its threads were waiting
    proc = subprocess.Popen(
        [str(BIN / script), *args],
        cwd=cwd,
        env={**command_env(log_dir, env), "PYTHONFAULTHANDLER": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stdout, stderr = _stop_hung(proc)
        raise AssertionError(
            f"{script} {' '.join(args)} ran past {timeout} s; where its processes waited (faulthandler, "
            f"newest last):\n{stderr[-12000:]}\n--- stdout ---\n{stdout[-3000:]}"
        ) from None
    return CLIResult(proc.returncode, stdout, stderr, log_dir)


def _stop_hung(proc: subprocess.Popen) -> tuple[str, str]:
    """SIGABRT to ``proc``'s process group (faulthandler prints every thread's stack and the process
    ends), SIGKILL to whatever is left; what the processes printed."""
    for sig, wait in ((signal.SIGABRT, 20), (signal.SIGKILL, 20)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            return proc.communicate(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
    return "", "(no output: the processes did not end after SIGKILL)"


def call_main(script: str, *args: str, cwd: Path, capture, env: dict[str, str] | None = None) -> CLIResult:
    """Run ``script``'s ``main`` (the function its console script calls) in this process, as
    :func:`run_command` runs the script: the same command line, environment and working directory, its
    exit status and what it printed (``capture``: pytest's ``capfd``), logs under ``cwd/logs``.

    For commands that need no process of their own (a refusal, a few training steps without W&B or DDP),
    which would otherwise cost a process start: seconds of imports. What the command changes in this
    process is put back afterwards."""
    (main,) = (e.load() for e in entry_points(group="console_scripts", name=script))
    log_dir = cwd / "logs"
    capture.readouterr()  # what was printed before is not this command's
    with _process_state_restored():
        os.environ.clear()
        os.environ.update(command_env(log_dir, env))
        os.chdir(cwd)
        sys.argv = [str(BIN / script), *args]
        try:
            main()
            code = 0
        except SystemExit as done:
            code = done.code if isinstance(done.code, int) else int(done.code is not None)
            if isinstance(done.code, str):
                print(done.code, file=sys.stderr)  # as the interpreter prints it on the way out
    out, err = capture.readouterr()
    return CLIResult(code, out, err, log_dir)


@contextlib.contextmanager
def _process_state_restored() -> Iterator[None]:
    """Put back what a command's ``main`` changes in the process: environment, working directory,
    command line, Hydra's global state, the logging Hydra configures, torch's thread count and
    determinism switch, and the random generators its seeding sets."""
    import torch
    from hydra.core.global_hydra import GlobalHydra

    env, cwd, argv = dict(os.environ), os.getcwd(), sys.argv
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    rngs = random.getstate(), np.random.get_state(), torch.get_rng_state()
    GlobalHydra.instance().clear()
    try:
        yield
    finally:
        GlobalHydra.instance().clear()
        for handler in root.handlers:
            if handler not in handlers:
                handler.close()  # Hydra's handler of the job's log file
        root.handlers[:], root.level = handlers, level
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
        random.setstate(rngs[0])
        np.random.set_state(rngs[1])
        torch.set_rng_state(rngs[2])
        os.chdir(cwd)
        sys.argv = argv
        os.environ.clear()
        os.environ.update(env)


def compose_train(*overrides: str):
    """The config ``mrl-train <overrides>`` composes, outside a Hydra job (for building modules in tests)."""
    from hydra import compose, initialize_config_dir

    from mrl.config_path import config_dir
    from mrl.resolvers import register_resolvers

    register_resolvers()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose("train", overrides=["paths.output_dir=/tmp/unused", *overrides])


# A process holding a directory as a running job does (mrl.files.directory_lock's protocol, written out:
# a POSIX lock on <dir>/.mrl.lock), until it is killed.
_HOLDER = """
import fcntl, os, sys, time
fd = os.open(os.path.join(sys.argv[1], ".mrl.lock"), os.O_RDWR | os.O_CREAT)
fcntl.lockf(fd, fcntl.LOCK_EX)
os.write(fd, b"a test's holder")
print("held", flush=True)
time.sleep(600)
"""


@contextlib.contextmanager
def directory_held(directory: Path) -> Iterator[subprocess.Popen]:
    """Another process holds ``directory`` (created) while the block runs; it is killed (SIGKILL, as a
    crash would end it) when the block ends."""
    directory.mkdir(parents=True, exist_ok=True)
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(directory)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        yield holder
    finally:
        holder.kill()
        holder.wait()


# ---- what a run wrote --------------------------------------------------------------------------------


def read_results(job_dir: Path) -> dict[str, float]:
    return json.loads((job_dir / "results.json").read_text())


def wandb_run_dirs(job_dir: Path) -> list[Path]:
    return sorted((job_dir / "wandb").glob("offline-run-*"))


def wandb_inspect(run_dir: Path) -> tuple[dict, list[dict]]:
    """What really reached W&B: (summary object, history rows) from `wandb leet inspect --json`."""
    summary = json.loads(leet_inspect(run_dir, "--summary", "--json"))
    return summary, wandb_history(run_dir)


def wandb_records(run_dir: Path, kind: str | None = None) -> list[dict]:
    """The records of one ``kind`` ("history", "metric", ...; every record with ``None``) W&B wrote to
    the run's file so far (the run may still be running or be killed), from ``wandb leet inspect
    --json``."""
    parsed = [json.loads(line) for line in leet_inspect(run_dir, "--json").splitlines() if line.strip()]
    return parsed if kind is None else [r[kind] for r in parsed if r.get("type") == kind]


def wandb_metric_definitions(run_dir: Path) -> dict[str, dict]:
    """The run's ``define_metric`` records as W&B wrote them, by metric name (or glob)."""
    return {m.get("name") or m.get("glob_name"): m for m in wandb_records(run_dir, "metric")}


def wandb_history(run_dir: Path) -> list[dict]:
    """The history rows W&B wrote to the run's file so far."""
    return [record["item"] for record in wandb_records(run_dir, "history")]


def comparable(results: dict[str, float]) -> dict[str, float]:
    """The results an interrupted and resumed run must share with an uninterrupted one."""
    return {k: v for k, v in results.items() if k.startswith(("val/", "test/", "train/acc"))}


# ---- a run in the background: stopped, signalled and killed at known steps ---------------------------


class Run:
    """An ``mrl-train`` process started by :func:`start`: its own process group (so a kill takes its
    loader workers too), output in a file (a full pipe cannot block it while nobody reads)."""

    def __init__(self, proc: subprocess.Popen, log: Path) -> None:
        self.proc, self.log = proc, log

    @property
    def output(self) -> str:
        return self.log.read_text(errors="replace")


def start(tmp_path: Path, *args: str, env: dict[str, str] | None = None, stop_at: str = "") -> Run:
    """Start ``mrl-train`` in ``tmp_path`` (logs under ``tmp_path/logs``; ``env`` adds to
    :func:`command_env`'s variables); ``stop_at="4,8"`` makes it stop itself at those steps (once each,
    also across a resume: see fault_injection.StopAtSteps)."""
    if stop_at:
        args = (*args, *fault_injection.stop_at(stop_at, tmp_path / "stops"))
    log = tmp_path / f"mrl-train-{len(list(tmp_path.glob('mrl-train-*.log')))}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [str(BIN / "mrl-train"), *args],
            cwd=tmp_path,
            env=command_env(tmp_path / "logs", env),
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


# ---- data sets on disk -------------------------------------------------------------------------------


def write_idx(path: Path, array: np.ndarray) -> None:
    """``array`` as a gzipped IDX file (the MNIST / Fashion-MNIST release format)."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def write_fashion_mnist(root: Path) -> Path:
    """A Fashion-MNIST folder in the Debian layout with 300 train and 100 test learnable images."""
    rng = np.random.default_rng(0)
    root.mkdir()
    prototypes = rng.integers(0, 256, size=(10, 28, 28))
    for prefix, n in (("train", 300), ("t10k", 100)):
        labels = rng.integers(0, 10, size=n)
        images = np.clip(prototypes[labels] + rng.normal(0, 40, size=(n, 28, 28)), 0, 255)
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return root


def write_cifar(root: Path, kind: str, per_file: int = 20, seed: int = 0) -> Path:
    """Random CIFAR-10 (``kind="cifar10"``) or CIFAR-100 images in torchvision's on-disk format."""
    rng = np.random.default_rng(seed)
    if kind == "cifar10":
        folder, files, key, classes = (
            root / "cifar-10-batches-py",
            [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"],
            "labels",
            10,
        )
    else:
        folder, files, key, classes = root / "cifar-100-python", ["train", "test"], "fine_labels", 100
    folder.mkdir(parents=True)
    for name in files:
        n = per_file * (5 if kind == "cifar100" and name == "train" else 1)
        labels = rng.integers(0, classes, size=n).tolist()
        data = rng.integers(0, 256, size=(n, 3 * 32 * 32), dtype=np.uint8)
        with open(folder / name, "wb") as f:
            pickle.dump({"data": data, key: labels}, f)
    return root


# ---- hand-made job directories (what mrl-train leaves, without training) -----------------------------


def write_job_dir(
    job: Path, head: dict, seed: int, results: dict | None, overrides: tuple[str, ...] = (), **config
) -> Path:
    """A job dir: resolved_config.yaml, .hydra/overrides.yaml and (unless None) results.json."""
    import yaml

    (job / ".hydra").mkdir(parents=True)
    resolved = {"seed": seed, "head": head, "trainer": {"max_epochs": 4}, "threads": None, **config}
    (job / "resolved_config.yaml").write_text(yaml.safe_dump(resolved))
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"seed={seed}", *overrides]))
    if results is not None:
        (job / "results.json").write_text(json.dumps(results))
    return job


def top1_results(per_size: dict[int, float], split: str = "test") -> dict:
    """results.json's top-1 accuracies at the given sizes, and a loss."""
    return {**{f"{split}/acc@{d}": v for d, v in per_size.items()}, "val/loss": 0.5}


# ---- references written out by hand -----------------------------------------------------------------


def reference_draw(num_sizes: int, k: int, seed: int, step: int) -> set[int]:
    """The size sampler's documented rule written out: the full size, and the k smallest of G - 1
    uniforms drawn by a generator seeded from (seed, step)."""
    import torch

    generator = torch.Generator().manual_seed(
        int(np.random.SeedSequence(seed, spawn_key=(step,)).generate_state(1)[0])
    )
    scores = torch.rand(num_sizes - 1, generator=generator)
    return {num_sizes - 1, *scores.argsort()[:k].tolist()}


def unit_prefix(x: np.ndarray, d: int) -> np.ndarray:
    """The first ``d`` features of each row, scaled to unit length (float32)."""
    p = np.asarray(x[:, :d], dtype=np.float32)
    return p / np.maximum(np.linalg.norm(p, axis=1, keepdims=True), 1e-12).astype(np.float32)


def reference_int8(db: np.ndarray, q: np.ndarray, d: int) -> tuple[np.ndarray, np.ndarray]:
    """Codes and (queries x database) scores by hand: each dimension's [min, max] over the normalised
    database prefixes split into 255 steps, code = floor(255 * (x - min) / (max - min)) (0 where the
    range is empty), decoded at the middle of its step; float32 query . decoded code."""
    xb, xq = unit_prefix(db, d), unit_prefix(q, d)
    low, high = xb.min(axis=0), xb.max(axis=0)
    span = high - low
    safe = np.where(span > 0, span, 1).astype(np.float32)
    codes = np.where(span > 0, np.floor(255 * np.clip((xb - low) / safe, 0, 1)), 0).astype(np.uint8)
    decoded = low + (codes.astype(np.float32) + 0.5) / 255 * span
    return codes, xq.astype(np.float64) @ decoded.T.astype(np.float64)


def reference_binary(db: np.ndarray, q: np.ndarray, d: int, threshold: str) -> np.ndarray:
    """Hamming distances (queries x database) by hand: bits above 0 (or each dimension's database mean)
    of the normalised prefixes, packed to bytes, popcount of the XOR."""
    xb, xq = unit_prefix(db, d), unit_prefix(q, d)
    t = xb.mean(axis=0) if threshold == "mean" else 0.0
    packed_b, packed_q = np.packbits(xb > t, axis=1), np.packbits(xq > t, axis=1)
    xor = packed_q[:, None, :] ^ packed_b[None, :, :]
    return np.unpackbits(xor, axis=2).sum(axis=2)


def reference_metrics(ids: np.ndarray, db_y: np.ndarray, q_y: np.ndarray, k: int) -> dict[str, float]:
    """mAP@k by the retrieval section's definition, 1-NN = the best neighbour's label."""
    from mrl.eval.retrieval import retrieval_metrics

    return {
        f"map@{k}": retrieval_metrics(db_y[ids], q_y, db_y, [k])[f"map@{k}"],
        "1nn": float(np.mean(db_y[ids[:, 0]] == q_y)),
    }


def write_evaluation(
    job: Path, report: dict, layout: str, ckpt: str = "last", mtime: float | None = None
) -> Path:
    """Write ``report`` where an evaluation of ``<job>/checkpoints/<ckpt>.ckpt`` puts it: ``evaluate``
    (mrl-train evaluate=), ``mrl-eval`` (its own dir under the log dir, linked from the job) or ``old``
    (eval/report.json, from earlier versions)."""
    from mrl.eval import locations

    ckpt_path = job / "checkpoints" / f"{ckpt}.ckpt"
    ckpt_id = f"{abs(hash((str(job), ckpt))) % 10**10:010d}"
    record = locations.checkpoint_record(ckpt_path, ckpt_id)
    if layout == "evaluate":
        out = locations.after_training_dir(job, ckpt_path, ckpt_id)
    elif layout == "mrl-eval":
        out = job.parents[1] / "eval" / "runs" / locations.standalone_dir_name(ckpt_path, ckpt_id)
    else:
        out, record = job / "eval", None
    out.mkdir(parents=True, exist_ok=True)
    path = out / "report.json"
    path.write_text(json.dumps({**report, **({"checkpoint": record} if record else {})}))
    if layout == "mrl-eval":
        link = job / "eval" / f"{locations.evaluation_name(ckpt_path, ckpt_id)}.json"
        link.parent.mkdir(parents=True, exist_ok=True)
        link.write_text(json.dumps({**record, "eval_dir": str(out)}))
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return path


def tiny_eval_context(cfg, kind: str = "mrl", device=None):
    """A tiny evaluation (200 database items, 40 queries, 3 classes, sizes 2..16, on ``device``: the CPU
    by default), built as mrl.eval.run builds it."""
    import torch

    from mrl.eval.context import EvalContext
    from mrl.nn.matryoshka_linear import MatryoshkaLinear

    rng = np.random.default_rng(0)
    centers = rng.normal(size=(3, 16)).astype(np.float32)
    db_y, q_y = rng.integers(0, 3, 200), rng.integers(0, 3, 40)
    db = centers[db_y] + rng.normal(size=(200, 16)).astype(np.float32)
    q = centers[q_y] + rng.normal(size=(40, 16)).astype(np.float32)
    torch.manual_seed(0)
    head = MatryoshkaLinear(16, 3, [2, 4, 8, 16])
    device = torch.device("cpu") if device is None else device
    return EvalContext.from_config(cfg, (db, db_y), (q, q_y), head, [2, 4, 8, 16], kind, device)


# ---- models to start from (mrl-train source=...) -----------------------------------------------------


def write_untrained_export(path: Path, *overrides: str, seed: int = 0) -> Path:
    """The ``model.safetensors`` of the model ``mrl-train <overrides>`` builds, with its seeded initial
    weights and its data's evaluation preprocessing: a frozen source for tests that need no trained one."""
    import torch

    from mrl.deploy.model import MatryoshkaModel
    from mrl.training.assemble import assemble

    torch.manual_seed(seed)
    module, datamodule = assemble(compose_train(*overrides))
    return MatryoshkaModel.from_module(module, datamodule).save(path)


PAPER_RESNET18_NESTING = (8, 16, 32, 64, 128, 256, 512)


def write_paper_checkpoint(path: Path, num_classes: int, seed: int = 0) -> Path:
    """A checkpoint of the paper's repository (RAIVNLab/MRL) in its layout: a torchvision ResNet-18 state
    dict (seeded weights) whose ``fc`` is the MRL head, one ``fc.nesting_classifier_<i>`` per size of
    :data:`PAPER_RESNET18_NESTING`, saved with DDP's ``module.`` prefix as its training code saves it."""
    import torch
    import torchvision

    torch.manual_seed(seed)
    state = {k: v for k, v in torchvision.models.resnet18(weights=None).state_dict().items()}
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    for i, d in enumerate(PAPER_RESNET18_NESTING):
        state[f"fc.nesting_classifier_{i}.weight"] = torch.randn(num_classes, d) / d**0.5
        state[f"fc.nesting_classifier_{i}.bias"] = torch.zeros(num_classes)
    torch.save({f"module.{k}": v for k, v in state.items()}, path)
    return path


@contextlib.contextmanager
def torch_threads(n: int = 1) -> Iterator[None]:
    """torch's intra-op threads set to ``n`` (as ``threads=1`` sets them in a run), then put back: tiny
    convolutions on a busy shared machine run many times faster on one thread than on all cores."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ---- processes of one gloo group ----------------------------------------------------------------------


def free_port() -> int:
    """A TCP port nothing listens on now, on 127.0.0.1."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _gloo_process(target, rank: int, world: int, port: int, out, args: tuple) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        send_to_parent(out, rank, target(rank, *args))
    finally:
        dist.destroy_process_group()


def send_to_parent(out, key, result) -> None:
    """Put ``(key, result)`` on a spawn context's queue so that it can be read after this process exits."""
    # Plain pickle bytes, not the tensors: torch's queue pickler shares a tensor's storage as a file
    # descriptor that the parent fetches from this process's resource-sharer socket, which is gone once
    # this process has exited (a race CI lost: FileNotFoundError in rebuild_storage_fd).
    out.put((key, pickle.dumps(result)))


def received_from_children(out, count: int, timeout: float) -> dict:
    """The ``count`` results that children sent with ``send_to_parent``, by key."""
    return {key: pickle.loads(result) for key, result in (out.get(timeout=timeout) for _ in range(count))}


def in_gloo_processes(target, *args, world: int = 2, timeout: float = 120) -> list:
    """``target(rank, *args)`` (a module-level function) in ``world`` spawned processes that form one gloo
    process group on 127.0.0.1; what each returned, by rank."""
    import torch.multiprocessing as mp

    context = mp.get_context("spawn")
    out = context.Queue()
    port = free_port()
    processes = [
        context.Process(target=_gloo_process, args=(target, rank, world, port, out, args))
        for rank in range(world)
    ]
    for process in processes:
        process.start()
    results = received_from_children(out, len(processes), timeout)
    for process in processes:
        process.join(timeout=60)
        assert process.exitcode == 0
    return [results[rank] for rank in range(world)]


def recorded_ranks(seen: Path, world: int, per_rank: int, epochs: int = 2) -> list[dict]:
    """What each of ``world`` DDP ranks trained on (batch_recorder.BatchRecorder's files in ``seen``),
    after checking that in every epoch each rank got ``per_rank`` images, each once, none of another's."""
    ranks = [json.loads((seen / f"rank{r}.json").read_text()) for r in range(world)]
    for epoch in map(str, range(epochs)):
        got = [rank[epoch] for rank in ranks]
        assert [len(images) for images in got] == [per_rank] * world, [len(images) for images in got]
        assert all(len(set(images)) == len(images) for images in got)
        assert len(set().union(*map(set, got))) == per_rank * world, (
            "two ranks trained on one image in an epoch"
        )
    return ranks


def saved_weights_val_accuracy(job: Path, sizes: tuple[int, ...]) -> tuple[dict[int, float], int]:
    """The top-1 accuracy at ``sizes`` of ``job``'s last checkpoint on its validation split, evaluated
    here with a plain loop (no Lightning, no DDP; the job's resolved config builds model and data), and
    the number of images."""
    import torch
    from omegaconf import OmegaConf

    from mrl.training.assemble import assemble

    module, dm = assemble(OmegaConf.load(job / "resolved_config.yaml"))
    ckpt = torch.load(job / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    module.load_state_dict(ckpt["state_dict"])
    module.eval()
    correct, total = torch.zeros(len(sizes)), 0
    with torch.inference_mode():
        for batch in dm.split_loader("val"):
            x, y = dm.model_inputs(batch)
            correct += (module.logits(x).argmax(-1) == y).sum(1)
            total += len(y)
    return {d: float(correct[g]) / total for g, d in enumerate(sizes)}, total


def shard_args(shards: Path | str, workers: int = 2) -> list[str]:
    """A tiny 2-epoch job on shards (a folder or an object-store URI), ``workers`` loader workers."""
    return [
        "data=shards",
        f"data.input_dir={shards}",
        "data.img_size=32",
        "data.batch_size=8",
        "data.eval_batch_size=16",
        f"data.num_workers={workers}",
        "data.pin_memory=false",
        "backbone.name=test_byobnet",
        "head.nesting=[2,8,64]",
        "trainer.max_epochs=2",
        "trainer.log_every_n_steps=1",
        "trainer.num_sanity_val_steps=0",
        "threads=1",
        "logger=csv",
    ]
