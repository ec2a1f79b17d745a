"""Progress inside the long evaluation stages: a log line at most every :data:`EVERY_S` seconds.

``mrl-eval`` logs one line per finished stage; on a large data set a stage (the searches at every size,
the post-hoc probes, the funnels) runs for minutes. Each such loop reports how far it got, throttled by
time, so a short evaluation prints nothing extra and a long one is never silent for long.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

log = logging.getLogger("mrl.eval")

# Seconds between two progress lines of one loop.
EVERY_S = 10.0


class Progress:
    """Counts the items of one loop and logs ``<what>: i/n (<item>) after <s>s`` when :data:`EVERY_S`
    seconds have passed since the loop started or since its last line."""

    def __init__(
        self,
        what: str,
        total: int | None = None,
        every_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.what, self.total, self.clock = what, total, clock
        self.every_s = EVERY_S if every_s is None else every_s  # read now: tests lower the module value
        self.done = 0
        self.started = self.last = clock()

    def step(self, item: str = "") -> bool:
        """One item done; returns whether a line was logged."""
        self.done += 1
        now = self.clock()
        if now - self.last < self.every_s:
            return False
        self.last = now
        count = f"{self.done}/{self.total}" if self.total else str(self.done)
        log.info("%s: %s%s after %.0fs", self.what, count, f" ({item})" if item else "", now - self.started)
        return True


class _Stages:
    """The evaluation stage running now and the progress of the loops that span several calls within it
    (exact searches: one call per size and evaluator), so their counts and seconds start with the
    stage, not with the process."""

    def __init__(self) -> None:
        self.name = ""
        self.loops: dict[str, Progress] = {}

    def begin(self, name: str) -> None:
        self.name, self.loops = name, {}

    def progress(self, what: str) -> Progress:
        if what not in self.loops:
            self.loops[what] = Progress(f"{self.name}: {what}" if self.name else what)
        return self.loops[what]


_stages = _Stages()


def begin_stage(name: str) -> None:
    """Start evaluation stage ``name``: the loops counted by :func:`stage_progress` start again at 0."""
    _stages.begin(name)


def stage_progress(what: str) -> Progress:
    """The progress of ``what`` (a loop whose items are separate calls, such as exact searches) within
    the current stage, its lines prefixed by the stage's name."""
    return _stages.progress(what)
