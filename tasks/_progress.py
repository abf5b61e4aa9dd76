"""Progress of a stage's loop, shown in the Prefect UI and, on a terminal, as a text bar.

The science modules report progress through a plain ``progress(done, total)`` callback (they never
import Prefect); a stage task passes a :class:`StageProgress`, which keeps a Prefect progress
artifact of its task run up to date and, when stderr is a terminal, redraws a bar there. Updates
are throttled: a loop of thousands of steps costs a few dozen API calls, not thousands.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from types import TracebackType
from typing import TextIO
from uuid import UUID

from prefect.artifacts import create_progress_artifact, update_progress_artifact

from unlearning_audit import distributed

API_INTERVAL_S = 2.0  # at most one artifact update per this many seconds
DRAW_INTERVAL_S = 0.1  # at most one redraw of the terminal bar per this many seconds
BAR_WIDTH = 30


def text_bar(name: str, done: int, total: int, elapsed: float) -> str:
    """A tqdm-style line: name, bar, done/total, percentage, elapsed time and time left."""
    share = done / total if total else 1.0
    filled = round(BAR_WIDTH * share)
    left = elapsed / done * (total - done) if done else 0.0
    return (
        f"{name} |{'#' * filled}{'.' * (BAR_WIDTH - filled)}| {done}/{total} {share:4.0%} "
        f"[{elapsed:.0f}s<{left:.0f}s]"
    )


class StageProgress:
    """A ``progress(done, total)`` callback for one loop of a stage, used as a context manager.

    Entering creates the progress artifact at 0%; leaving without an error sets it to 100% (a loop
    that stopped early, as unlearning at collapse does, is finished too). Leaving draws the bar's
    last state and ends its line. Given the ``artifact`` of another one (the audit's own, passed
    to the stage group that runs its models, maybe in another process), calling it advances
    that artifact, without entering.
    """

    def __init__(self, name: str, stream: TextIO | None = None, artifact: UUID | str | None = None):
        self.name = name
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.artifact = UUID(str(artifact)) if artifact is not None else None
        self.start = self.sent = time.monotonic()
        self.drawn = -math.inf  # the first call draws at once
        self.last = (0, 0)

    def __enter__(self) -> StageProgress:
        self.artifact = create_progress_artifact(0.0, description=f"{self.name}: starting")
        return self

    def __call__(self, done: int, total: int) -> None:
        self.last = (done, total)
        now = time.monotonic()
        if self.artifact is not None and (done >= total or now - self.sent >= API_INTERVAL_S):
            update_progress_artifact(
                self.artifact, 100.0 * done / total, description=f"{self.name}: {done}/{total}"
            )
            self.sent = now
        if self.tty and (done >= total or now - self.drawn >= DRAW_INTERVAL_S):
            self._draw(done, total, now)

    def _draw(self, done: int, total: int, now: float) -> None:
        self.stream.write("\r" + text_bar(self.name, done, total, now - self.start))
        self.stream.flush()
        self.drawn = now

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        done, total = self.last
        if kind is None and self.artifact is not None and (total == 0 or done < total):
            update_progress_artifact(
                self.artifact, 100.0, description=f"{self.name}: done after {done}/{total}"
            )
        if self.tty and total:
            self._draw(done, total, time.monotonic())
            self.stream.write("\n")
            self.stream.flush()


def stage_progress(name: str) -> StageProgress | contextlib.nullcontext:
    """A :class:`StageProgress` for a stage's loop, or none (a callback of None) in a rank of a
    stage run on several GPUs: a rank is a process of its own, outside the task's run."""
    if distributed.ranks()[1] > 1:
        return contextlib.nullcontext()
    return StageProgress(name)
