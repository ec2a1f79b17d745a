"""The hidden folder ``mrl-prepare-data`` builds its output in, and the leftovers of runs killed before
they could remove theirs.

The folder lies beside ``output_dir`` (``.<name>.partial-<id>``) and is renamed into place when every
split is complete. Its run holds an exclusive lock (``flock``) on the folder's lock file from creating the
folder until the rename; the run's writer processes inherit it, so the lock is free exactly when no
process of that run is left. A folder whose lock is free is provably stale: the next run removes it and
says so. A folder whose lock is held belongs to a live run; when it prepares the same ``output_dir``,
the new run is refused. A folder without a lock file (from an mrl older than the lock, or a run on
another machine sharing the disk) is only reported.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mrl.errors import MRLError

LOCK_NAME = ".mrl-prepare-data.lock"


@dataclass
class Staging:
    """A run's hidden output folder and the descriptor that holds its lock."""

    path: Path
    lock: int

    def publish(self, out: Path) -> None:
        """Rename the complete folder to ``out`` (absent or an empty folder) and let the lock go."""
        (self.path / LOCK_NAME).unlink()
        if out.exists():
            out.rmdir()  # empty (checked before); rename needs it gone on some file systems
        os.rename(self.path, out)

    def discard(self) -> None:
        remove(self.path)

    def close(self) -> None:
        os.close(self.lock)


def partial_name(out: Path) -> str:
    return f".{out.name}.partial-"


def claim(out: Path) -> Staging:
    """A new hidden folder beside ``out``, locked by this process (and the writers it forks)."""
    path = out.parent / f"{partial_name(out)}{uuid.uuid4().hex[:8]}"
    path.mkdir(parents=True)
    lock = os.open(path / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a new file: nobody else holds it
    owner = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    os.write(lock, json.dumps(owner).encode())
    return Staging(path, lock)


def clear_leftovers(out: Path, say: Callable[[str], None]) -> None:
    """Remove the stale hidden folders of mrl-prepare-data beside ``out`` (any output name), saying so;
    refuse when a live run prepares ``out`` itself; report the unknown ones of ``out``'s name."""
    if not out.parent.is_dir():
        return
    for path in sorted(out.parent.glob(".*.partial-*")):
        ours = path.name.startswith(partial_name(out))
        if not path.is_dir() or path.is_symlink():
            continue
        if not (path / LOCK_NAME).is_file():
            if ours:
                say(
                    f"{path} ({_size(path)}) looks like the leftovers of an interrupted mrl-prepare-data "
                    f"for {out}, but it holds no lock file (an older mrl wrote it), so it cannot be told "
                    "whether a run still writes it: delete it once no mrl-prepare-data runs."
                )
            continue
        _clear_locked(path, out, ours, say)


def _clear_locked(path: Path, out: Path, ours: bool, say: Callable[[str], None]) -> None:
    try:
        lock = os.open(path / LOCK_NAME, os.O_RDWR)
    except OSError:  # removed meanwhile by its run, which has finished
        return
    try:
        owner, host = _owner(lock)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if ours:
                raise MRLError(
                    f"Another mrl-prepare-data ({owner}) is preparing output_dir={out} right now, in {path}. "
                    "Wait for it to finish (or stop it), or choose another output_dir."
                ) from None
            return
        if host == socket.gethostname():
            size = _size(path)
            remove(path)
            left = f"{path} ({size}): the leftovers of an mrl-prepare-data ({owner}) that was killed"
            # another user's folder may not be ours to remove
            say(f"Cannot remove {left}; delete it yourself." if path.exists() else f"Removed {left}.")
        elif ours:  # a lock taken on another machine may not be visible here
            say(
                f"{path} ({_size(path)}) holds the partial output of an mrl-prepare-data ({owner}) that ran "
                "on another machine (or cannot be identified): delete it once that run has ended."
            )
    finally:
        os.close(lock)


def remove(path: Path) -> None:
    """Remove a hidden folder, its lock file last: cut short, what is left is still known as stale."""
    entries = []
    with contextlib.suppress(FileNotFoundError):  # removed meanwhile
        entries = list(path.iterdir())
    for entry in entries:
        if entry.name != LOCK_NAME:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
    (path / LOCK_NAME).unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        path.rmdir()


def _owner(lock: int) -> tuple[str, str | None]:
    """Who holds or held the lock, in words, and on which host."""
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        found = json.loads(os.pread(lock, 4096, 0))
        return f"pid {found['pid']} on {found['host']}, started {found['started']}", str(found["host"])
    return "owner unknown", None


def _size(path: Path) -> str:
    total = 0.0
    for folder, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(folder, name)).st_size
    for unit in ("bytes", "KB", "MB"):
        if total < 1000:
            return f"{total:.0f} {unit}" if unit == "bytes" else f"{total:.1f} {unit}"
        total /= 1000
    return f"{total:.1f} GB"
