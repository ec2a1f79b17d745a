"""The writer processes of ``mrl-prepare-data``, ended with the command whatever ends it.

Each split is written by a process of its own that leads a new process group: LitData's workers and the
helper processes they start join it, so the command ends every one of them at once (SIGKILL to the group)
when the split is done, has failed (LitData terminates its workers but not their helpers, which kept a
terminal or a ``| tee`` open forever) or the command is interrupted. A guard process in the group kills
it when the command itself is killed (SIGKILL, out of memory), so no writer outlives the command. Being
a group of their own, the writers do not receive the terminal's Ctrl-C: the command decides.

While :func:`signals_interrupt` is active, SIGINT, SIGTERM and SIGHUP raise :class:`Interrupted` (LitData
would otherwise catch SIGINT and exit 0, and SIGTERM would end the command before it cleans up).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from multiprocessing.connection import wait
from typing import Any

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
GUARD_POLL_S = 0.2

# The progress pipe's write end while a split is written: set before the writer is forked, so the
# writer and its workers inherit it (count_one); the command reads the other end.
_progress_fd: int | None = None


class Interrupted(KeyboardInterrupt):
    """The command received ``signum``; it ends its writers and removes its partial output on the way
    out, then exits with ``exit_code`` (128 + the signal's number, as shells report a signal)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)
        self.name = signal.Signals(signum).name
        self.exit_code = 128 + self.signum


def _raise_interrupted(signum: int, frame: Any) -> None:
    raise Interrupted(signum)


@contextlib.contextmanager
def signals_interrupt() -> Iterator[None]:
    """Within: SIGINT, SIGTERM and SIGHUP raise :class:`Interrupted`, so ``finally`` blocks run; the
    handlers before are restored after. Only the main thread can set handlers; elsewhere nothing
    changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _raise_interrupted) for s in SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Within: SIGINT, SIGTERM and SIGHUP wait (a second Ctrl-C cannot cut a cleanup short); they are
    delivered on the way out."""
    before = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


def count_one() -> None:
    """One more item written (called in the writer's worker processes; nothing elsewhere)."""
    if _progress_fd is not None:
        with contextlib.suppress(OSError):  # the command is gone: its guard ends this process
            os.write(_progress_fd, b".")


def run_in_group(target: Callable[..., None], args: tuple, on_progress: Callable[[int], None]) -> None:
    """Run ``target(*args)`` in a new process that leads a process group of its own; return when it
    returned, or raise ``RuntimeError`` with what it raised or how it ended. ``on_progress`` gets the
    number of :func:`count_one` calls so far, about once a second and at each change. However this
    ends (an exception here included), every process of the group is killed first."""
    global _progress_fd
    ctx = multiprocessing.get_context("fork")  # the target and its arguments are not pickled
    progress, _progress_fd = os.pipe()
    outcome, outcome_end = ctx.Pipe(duplex=False)
    writer = guard = None
    try:
        # deferred until both processes are in their group: a signal meanwhile could leave one outside it
        with signals_deferred():
            writer = ctx.Process(target=_writer, args=(target, args, progress, outcome_end), daemon=False)
            writer.start()
            with contextlib.suppress(OSError):  # the writer does it too: whichever runs first
                os.setpgid(writer.pid, writer.pid)
            outcome_end.close()
            os.close(_progress_fd)
            _progress_fd = None
            guard = ctx.Process(target=_guard, args=(os.getpid(), writer.pid), daemon=False)
            guard.start()
            with contextlib.suppress(OSError):
                os.setpgid(guard.pid, writer.pid)
        reported, message = _wait(writer, outcome, progress, on_progress)
    finally:
        with signals_deferred():
            _end(writer, guard)
            for fd in (progress, _progress_fd):
                if fd is not None:
                    os.close(fd)
            _progress_fd = None
            outcome.close()
            outcome_end.close()
    if not reported:
        raise RuntimeError(ended("its writer process", writer.exitcode))
    if message is not None:
        raise RuntimeError(message)


def ended(what: str, code: int | None) -> str:
    """How a process that never reported ended, from its exit code."""
    if code is not None and code < 0:
        name = signal.Signals(-code).name
        oom = " (the system's out-of-memory killer does that: fewer num_workers need less memory)"
        return f"{what} was killed by {name}" + (oom if -code == signal.SIGKILL else "")
    return f"{what} ended with exit code {code} without finishing"


def _wait(
    writer: Any, outcome: Any, progress: int, on_progress: Callable[[int], None]
) -> tuple[bool, str | None]:
    """Whether the writer reported before it ended, and what (None: done; its exit code tells the rest);
    the progress pipe is read meanwhile."""
    done = 0
    while True:
        ready = wait([writer.sentinel, outcome, progress], timeout=1.0)
        if progress in ready:
            done += len(os.read(progress, 1 << 16))
        on_progress(done)
        if outcome in ready or outcome.poll():
            return True, outcome.recv()
        if writer.sentinel in ready:
            return False, None


def _end(writer: Any, guard: Any) -> None:
    """Kill the writer's group (the writer is not reaped yet, so its number, the group's, cannot have
    been reused), then reap the writer and the guard."""
    if writer is not None and writer.pid is not None:
        with contextlib.suppress(OSError):
            os.killpg(writer.pid, signal.SIGKILL)
    if guard is not None and guard.pid is not None:
        guard.kill()  # in case it never joined the group
    for process in (writer, guard):
        if process is not None and process.pid is not None:
            process.join()


def _writer(target: Callable[..., None], args: tuple, progress: int, outcome: Any) -> None:
    """The writer process: lead a new group, run the target, report None or its error, exit."""
    with contextlib.suppress(OSError):
        os.setpgid(0, 0)
    for s in SIGNALS:
        signal.signal(s, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)
    os.close(progress)
    message = None
    try:
        target(*args)
    except BaseException as err:  # reported, not printed: the command says what went wrong
        message = f"{type(err).__name__}: {err}"
    with contextlib.suppress(OSError):
        outcome.send(message)
    os._exit(0)  # not multiprocessing's exit, which would wait for LitData's processes


def _guard(parent: int, group: int) -> None:
    """Kill the writer's group once the command is gone (killed: it could not do it itself)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)
    with contextlib.suppress(OSError):
        os.setpgid(0, group)
    while os.getppid() == parent:
        time.sleep(GUARD_POLL_S)
    with contextlib.suppress(OSError):
        os.killpg(group, signal.SIGKILL)
    os._exit(0)
