"""Test-only callbacks that break or pause a real ``mrl-train`` run at a known step, added through the
config like any callback (``+callbacks.fault._target_=fault_injection.InjectedFault``) with this folder on
PYTHONPATH (``conftest.run_cli`` and the reliability helpers put it there; DDP workers inherit it).

- :class:`InjectedFault` raises on one rank at one optimizer step, so a failing DDP rank can be seen
  taking the whole job down with a clear message instead of a hang;
- :class:`StopAtSteps` stops the process (``SIGSTOP``) at given optimizer steps, after every earlier
  step's checkpoint and logged metrics were handed over, so a test can signal or kill a run at a known
  step instead of racing it with a wall clock (``SIGCONT`` lets it go on).
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Callback


class InjectedFault(Callback):
    """Raise a ``RuntimeError`` on global rank ``rank`` when it reaches optimizer step ``step``."""

    def __init__(self, rank: int, step: int) -> None:
        self.rank, self.step = int(rank), int(step)

    def on_train_batch_start(self, trainer: L.Trainer, *args) -> None:
        if trainer.global_rank == self.rank and trainer.global_step >= self.step:
            raise RuntimeError(f"injected fault on rank {self.rank} at step {trainer.global_step}")


class StopAtSteps(Callback):
    """Stop the process at each optimizer step of ``steps``, once per step across restarts.

    At the start of a batch: Lightning saves a step's checkpoint before it logs that step's metrics (both
    at the end of the previous batch), so only here are both done. A resumed or requeued run reloads
    this callback from its config; the marker files in ``marker_dir`` keep it from stopping again at a
    step it already stopped at.
    """

    def __init__(self, steps: list[int], marker_dir: str) -> None:
        self.steps = {int(s) for s in steps}
        self.marker_dir = Path(marker_dir)

    def on_train_batch_start(self, trainer: L.Trainer, *args) -> None:
        step = trainer.global_step
        marker = self.marker_dir / f"stopped_at_{step}"
        if step in self.steps and not marker.exists():
            self.marker_dir.mkdir(parents=True, exist_ok=True)
            marker.touch()  # once: accumulated batches share their step, and restarts pass it again
            os.kill(os.getpid(), signal.SIGSTOP)


def stop_at(steps: str, marker_dir: Path) -> list[str]:
    """The overrides that make a run stop itself at ``steps`` ("4,8")."""
    return [
        "+callbacks.stop._target_=fault_injection.StopAtSteps",
        f"+callbacks.stop.steps=[{steps}]",
        f"+callbacks.stop.marker_dir={marker_dir}",
    ]


def fault_at(rank: int, step: int) -> list[str]:
    """The overrides that make rank ``rank`` fail at optimizer step ``step``."""
    return [
        "+callbacks.fault._target_=fault_injection.InjectedFault",
        f"+callbacks.fault.rank={rank}",
        f"+callbacks.fault.step={step}",
    ]


def tests_on_pythonpath(env: dict[str, str]) -> dict[str, str]:
    """``env`` with this folder first on PYTHONPATH, so a run (and its DDP workers) can load these."""
    here = str(Path(__file__).resolve().parent)
    return {**env, "PYTHONPATH": os.pathsep.join(p for p in (here, env.get("PYTHONPATH")) if p)}
