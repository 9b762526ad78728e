"""Checkpoints written while training goes on (`checkpoint_async=true`).

At a step boundary the trainer stages the checkpoint (`checkpoint.stage_checkpoint`: the state copied
to host memory, a collective over the training group); then a thread of each process writes it and
the main process publishes it (`checkpoint.write_staged`: checksums, manifest, fsync, rename, prune),
meeting the others over a process group of its own. A new checkpoint waits for the one in flight, so
host memory holds one staged copy per process at most. A kill meanwhile leaves the previous
checkpoint the newest complete one. A write that failed is raised on every process at the next wait:
the next checkpoint, a stop, or the run's end.
"""

from __future__ import annotations

import threading
import time

from disttrain.checkpoint import Staged, write_staged
from disttrain.engines.base import Engine
from disttrain.engines.process_group import gather_over, side_group


class BackgroundWriter:
    """At most one checkpoint in flight, written by a thread of each process."""

    def __init__(self, engine: Engine, keep: int, timeout_s: int, slow_write: tuple[int, float] = (0, 0.0)):
        self.engine, self.keep = engine, keep
        self.slow_write = slow_write  # (step, seconds): debug.slow_write_at, a rehearsed slow disk
        self.group = side_group(timeout_s)  # every process creates it, at the same point of its start
        self._thread: threading.Thread | None = None
        self._outcome: str | BaseException | None = None

    def start(self, staged: Staged) -> str:
        """Write `staged` in the background (after the checkpoint in flight); the path it will have."""
        self.wait()
        gather = gather_over(self.group)

        def write() -> None:
            if staged.step == self.slow_write[0]:
                time.sleep(self.slow_write[1])
            try:
                self._outcome = write_staged(staged, self.engine, self.keep, gather, lambda: gather(None))
            except BaseException as e:  # raised in the main thread, at its next wait
                self._outcome = e

        self._thread = threading.Thread(target=write, name="disttrain-checkpoint", daemon=True)
        self._thread.start()
        return staged.final

    def wait(self) -> str | None:
        """The checkpoint in flight, once published (None when there was none); raises its error."""
        if self._thread is None:
            return None
        self._thread.join()
        self._thread = None
        outcome, self._outcome = self._outcome, None
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome
