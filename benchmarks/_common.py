"""Shared by the throughput benchmarks: the same model trained by `mrl-train` and by a bare loop."""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import lightning as L
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from mrl.config_path import config_dir
from mrl.training.assemble import assemble

BIN = Path(sys.executable).parent
# Train only: no validation, test, checkpoints; the epoch clock is the EpochTimer callback.
TRAIN_ONLY = [
    "+trainer.limit_val_batches=0",
    "trainer.num_sanity_val_steps=0",
    "test=false",
    "callbacks=none",
]


def compose_cfg(overrides: list[str], output_dir: str) -> DictConfig:
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose("train", overrides=[*overrides, f"paths.output_dir={output_dir}"])


def mrl_train_epochs(overrides: list[str], workdir: Path, skip_batches: int = 0) -> list[float]:
    """Run the `mrl-train` console script; return each training epoch's seconds (EpochTimer, from its
    ``skip_batches``-th batch on)."""
    return mrl_train_timing(overrides, workdir, skip_batches)["epoch_seconds"]


def mrl_train_timing(
    overrides: list[str], workdir: Path, skip_batches: int = 0, train_only: bool = True
) -> dict[str, list]:
    """``{"epoch_seconds": [...], "samples": [...]}`` of an `mrl-train` run (the EpochTimer's record); with
    ``train_only`` without validation, test and the configured callbacks (checkpoints)."""
    timer = workdir / f"epochs_{time.monotonic_ns()}.json"
    args = [
        *overrides,
        *(TRAIN_ONLY if train_only else []),
        "+callbacks.timer._target_=mrl.tracking.timing.EpochTimer",
        f"+callbacks.timer.path={timer}",
        f"+callbacks.timer.skip_batches={skip_batches}",
    ]
    env = {"MRL_LOG_DIR": str(workdir / "logs"), "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    if IN_PROCESS:
        _mrl_train_here(args, workdir, env)
        return json.loads(timer.read_text())
    proc = subprocess.run(
        [str(BIN / "mrl-train"), *args],
        cwd=workdir,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        tail = f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
        raise RuntimeError(f"mrl-train {' '.join(args)} failed:\n{tail}")
    return json.loads(timer.read_text())


# --quick runs every mrl-train job in the benchmark's own process: the same code as a smoke test, without
# a process start (seconds of imports) per job. Measured runs keep a fresh process per job.
IN_PROCESS = False


def _mrl_train_here(args: list[str], workdir: Path, env: dict[str, str]) -> None:
    """``mrl-train args`` in this process (its ``main``), in ``workdir`` with ``env`` added; the
    process's environment, folder, command line and Hydra state are put back afterwards."""
    from hydra.core.global_hydra import GlobalHydra

    from mrl.cli.train import main

    saved_env, saved_cwd, saved_argv = dict(os.environ), os.getcwd(), sys.argv
    GlobalHydra.instance().clear()
    try:
        os.environ.update(env)
        os.chdir(workdir)
        sys.argv = [str(BIN / "mrl-train"), *args]
        try:
            main()
        except SystemExit as done:
            if done.code not in (0, None):
                raise RuntimeError(f"mrl-train {' '.join(args)} failed: {done.code}") from None
    finally:
        GlobalHydra.instance().clear()
        os.environ.clear()
        os.environ.update(saved_env)
        os.chdir(saved_cwd)
        sys.argv = saved_argv


def bare_loop_epochs(overrides: list[str], device: str = "cpu", bf16: bool = False) -> list[float]:
    """The same model, data, batch size, optimizer, scheduler and head in a plain PyTorch loop."""
    with tempfile.TemporaryDirectory() as out:
        cfg = compose_cfg(overrides, out)
    L.seed_everything(cfg.seed)
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    module, data = assemble(cfg)
    data.setup("fit")
    loader = data.train_dataloader()
    module.to(device).train()
    if cfg.get("compile"):
        module.backbone.compile()
    optimizer = module.optimizer_factory(module)
    epochs = int(cfg.trainer.max_epochs)
    scheduler, _ = module.scheduler_factory(
        optimizer, num_epochs=epochs, updates_per_epoch=len(loader), step_on_epochs=False
    )
    times, updates = [], 0
    for _ in range(epochs):
        sync(device)
        start = time.perf_counter()
        for batch in loader:
            # the datamodule's own transfer hooks (uint8 -> normalised floats on the device), as in training
            x, y = data.model_inputs(batch, device)
            train_step(module, optimizer, x, y, device, bf16)
            updates += 1
            scheduler.step_update(num_updates=updates)
        sync(device)
        times.append(time.perf_counter() - start)
    return times


def train_step(module, optimizer, x: torch.Tensor, y: torch.Tensor, device: str, bf16: bool) -> None:
    """Forward, loss, backward and optimizer step: the same head + loss computation as mrl-train's
    training step (one fused node by default), without the per-size accuracy that is part of the
    platform's cost."""
    with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
        per_size, _ = module.criterion.per_size_from_embedding(module.head, module(x), y)
        loss = module.criterion.combine(per_size)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def median_ms(fn: Callable[[], object], reps: int, warmup: int) -> float:
    """Median milliseconds of ``reps`` calls of ``fn``, after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def steady(times: list[float]) -> float:
    """Median epoch time without the first epoch (allocator, kernel and compile warm-up)."""
    return statistics.median(times[1:] if len(times) > 1 else times)


def fmt_ratio(a: float, b: float) -> str:
    return "n/a" if not b or math.isnan(b) else f"{a / b:.3f}"


def _status_kib(field: str) -> int:
    """A /proc/self/status field in KiB."""
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


@contextlib.contextmanager
def memory_peaks() -> Iterator[dict[str, float]]:
    """The block's memory peaks above the process's memory at its start, in MiB, filled in at its end:
    ``anon_mib`` (RssAnon sampled every 2 ms: the process's own allocations, without the pages of
    memory-mapped files) and ``hwm_mib`` (VmHWM, reset at the start: those pages included)."""
    anon_before, rss_before = _status_kib("RssAnon"), _status_kib("VmRSS")
    peak_anon = anon_before
    done = threading.Event()

    def sample() -> None:
        nonlocal peak_anon
        while not done.is_set():
            peak_anon = max(peak_anon, _status_kib("RssAnon"))
            time.sleep(0.002)

    peaks: dict[str, float] = {}
    sampler = threading.Thread(target=sample)
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := the current RSS
    sampler.start()
    try:
        yield peaks
    finally:
        done.set()
        sampler.join()
        peaks["anon_mib"] = (peak_anon - anon_before) / 1024
        peaks["hwm_mib"] = (_status_kib("VmHWM") - rss_before) / 1024
