"""Result files appear whole or not at all, with the permissions the user's umask gives new files.

One writer for every result file (``results.json``, ``report.json``, plots, exported embeddings,
``model.safetensors``, checkpoints): write a hidden temporary file beside the target, flush it to disk,
give it the umask's mode and rename it into place. A reader (or a run killed half-way, or a full disk)
never sees a partial file under the real name. ``tempfile.mkstemp`` alone would leave the file 0600,
unreadable to colleagues sharing the file system.

And one job per directory: :func:`directory_lock` keeps a second job out of a directory a running job
writes into (two ``mrl-train`` of one ``hydra.run.dir``, two ``resume=`` of one run, two ``mrl-eval`` of
one checkpoint).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mrl.errors import MRLError

log = logging.getLogger(__name__)


def _umask() -> int:
    # os.umask can only be read by setting it; set it straight back.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode a new regular file gets under the current umask (0o644 under the usual 022)."""
    return 0o666 & ~_umask()


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write ``path``'s content to; on success it replaces ``path``.

    The temporary file is fsynced before the rename (a crash cannot leave an empty file under the
    real name) and removed when the block raises.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def unwritable(path: str | Path) -> str | None:
    """Why ``path`` cannot be created or written into (its nearest existing ancestor is a file, or a
    directory this user cannot write), or None when it can."""
    path = Path(path).expanduser().absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        return f"{existing} is a file, not a directory"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable"
    return None


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` so that readers never see half of it."""
    return atomic_write_bytes(path, text.encode())


def write_json(path: str | Path, data: Any) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


# ---- one job per directory ---------------------------------------------------------------------------

LOCK_NAME = ".mrl.lock"
# Directories this process holds: path -> [lock file descriptor, nesting depth]. A POSIX lock belongs to
# the process, and closing any descriptor of the file drops it: a second ``directory_lock`` of the same
# directory in this process (mrl-train takes its run dir before Hydra starts and again in the job) must
# reuse the first descriptor, never open the file again.
_HELD: dict[str, list[int]] = {}


class DirectoryInUse(MRLError):
    """Another process holds the directory (:func:`directory_lock`)."""


@contextmanager
def directory_lock(directory: str | Path, command: str) -> Iterator[Path]:
    """Hold ``directory`` for this process while the block runs; a second process asking for it meanwhile
    gets a :class:`DirectoryInUse` naming the holder, before it writes anything there.

    The lock is a POSIX record lock (``fcntl.lockf``) on ``<directory>/.mrl.lock``: the kernel drops it
    when the holding process ends, however it ends, so a killed job never leaves a lock that blocks; forked
    children (data loader workers) do not inherit it; and it holds across the clients of a network file
    system. The file is removed when the block ends; a directory the block created is removed again when
    it is left empty. Re-entrant within a process; nothing else in the holding process may open the lock
    file (closing any descriptor of a file drops the process's POSIX locks on it). On a file system
    without locks (some FUSE mounts) the block runs unlocked, with a warning.
    """
    directory = Path(directory).resolve()  # one key however the directory is named (links, ..)
    key = str(directory)
    if key in _HELD:
        _HELD[key][1] += 1
        try:
            yield directory
        finally:
            _HELD[key][1] -= 1
        return
    created = not directory.exists()
    directory.mkdir(parents=True, exist_ok=True)
    lock_path = directory / LOCK_NAME
    fd = None
    try:
        fd = _acquire(lock_path, command)
        if fd is not None:
            _HELD[key] = [fd, 1]
        yield directory
    finally:
        if fd is not None:
            del _HELD[key]
            lock_path.unlink(missing_ok=True)  # before the lock goes: see _acquire
            os.close(fd)
        if created:
            with contextlib.suppress(OSError):
                directory.rmdir()  # only when empty: a refused or failed start leaves nothing


def _acquire(lock_path: Path, command: str) -> int | None:
    """A descriptor of ``lock_path`` holding its lock (None where the file system has no locks)."""
    while True:
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as err:
            raise MRLError(
                f"Cannot write into {lock_path.parent} ({err.strerror}). Choose a writable directory."
            ) from None
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno in (errno.EACCES, errno.EAGAIN):
                raise DirectoryInUse(_in_use(lock_path, command)) from None
            log.warning("Cannot lock %s (%s): nothing keeps another job out of it.", lock_path, err.strerror)
            return None
        # The holder removes the file before it unlocks: a lock won on a file that was removed meanwhile
        # guards nothing, so take the file now under that name instead.
        with contextlib.suppress(FileNotFoundError):
            if os.stat(lock_path).st_ino == os.fstat(fd).st_ino:
                holder = f"{command}, process {os.getpid()} on {socket.gethostname()}, since {time.ctime()}"
                os.ftruncate(fd, 0)
                os.pwrite(fd, holder.encode(), 0)
                return fd
        os.close(fd)


def _in_use(lock_path: Path, command: str) -> str:
    try:
        holder = lock_path.read_text(errors="replace").strip() or "another process"
    except OSError:
        holder = "another process"
    return (
        f"{lock_path.parent} is in use by another job ({holder}): two jobs writing into one directory "
        f"would overwrite each other's checkpoints, results and W&B run. This {command} was refused before "
        "it wrote any results there. Wait until that job has finished (or stop it), or give this one "
        "another directory. A job that was killed holds nothing: its lock ends with its process."
    )
