"""Where this process is in the run: the training loop records it, the watchdog reads it.

A record is two attribute stores (a tuple and a clock reading), a fraction of a microsecond, a few
times per micro-batch: nothing a step can measure (bench/loop.py runs the trainer with it).
"""

from __future__ import annotations

import time
from typing import NamedTuple

STARTUP = "start-up"
DATA = "data"
COUNTS = "item counts"
FORWARD = "forward"
BACKWARD = "backward"
OPTIMIZER = "optimizer"
STEP_END = "step end"
EVALUATION = "evaluation"
CHECKPOINT = "checkpoint write"
EXPORT = "export"

# What a process in each phase is doing, for the stall report.
DOING = {
    STARTUP: "starting: the DataLoader's workers, the first step's set-up",
    DATA: "waiting for a micro-batch (from the DataLoader's workers, or loading it inline)",
    COUNTS: "all-reducing the window's item counts (a collective: it waits for every process)",
    FORWARD: "the forward of a micro-batch (the recipe's losses)",
    BACKWARD: "the backward of a micro-batch; the window's last one syncs the gradients (a collective: it "
    "waits for every process)",
    OPTIMIZER: "the update: unscale, clip, step, zero (collectives under ZeRO and FSDP2)",
    STEP_END: "the step's end: losses reduced for the log, the stop flag all-reduced (collectives)",
    EVALUATION: "evaluating (the recipe's evaluate, then a reduction over processes)",
    CHECKPOINT: "writing a checkpoint (collectives, then the disk)",
    EXPORT: "writing the final weights",
}
# Order within a step, for telling which process is behind the others; the last four come after
# the step's windows.
_ORDER = {STARTUP: -1, DATA: 0, COUNTS: 1, FORWARD: 2, BACKWARD: 3, OPTIMIZER: 4, STEP_END: 5}
_ORDER.update({EVALUATION: 6, CHECKPOINT: 7, EXPORT: 8})


class Where(NamedTuple):
    phase: str
    step: int  # optimizer steps done before this one: the 0-based index of the step under way
    part: int  # which of the step's phases (a GAN step has a D and a G window)
    micro: int  # micro-batch index in the window, -1 where none applies
    window: int  # micro-batches in the window

    def position(self) -> tuple[int, int, int, int]:
        """Sortable: a process whose position is lower is behind."""
        if self.phase in (FORWARD, BACKWARD):  # micro-batch by micro-batch
            return (self.step, self.part, _ORDER[FORWARD], 2 * self.micro + (self.phase == BACKWARD))
        return (self.step, self.part, _ORDER[self.phase], self.micro)

    def describe(self, steps: int) -> str:
        if self.phase == STARTUP:
            return f"{self.phase}, before step {self.step + 1} of {steps}"
        if _ORDER[self.phase] > _ORDER[OPTIMIZER]:
            return f"{self.phase} after step {self.step + 1} of {steps}"
        text = f"{self.phase} at step {self.step + 1} of {steps}"
        if self.part:
            text += f" (window {self.part + 1} of the step)"
        if self.micro >= 0:
            text += f", micro-batch {self.micro + 1} of {self.window}"
        return text


class Progress:
    """This process's phase, step and micro-batch, and when it last moved."""

    def __init__(self) -> None:
        self._step, self._part, self._window = 0, 0, 0
        self.where = Where(STARTUP, 0, 0, -1, 0)
        self.moved = time.monotonic()

    def window(self, step: int, part: int, micro_batches: int) -> None:
        """Entering window `part` of step `step` (0-based); recorded with the next phase. Phases
        after the step's windows (its end, evaluation, checkpoint) belong to the same step."""
        self._step, self._part, self._window = step, part, micro_batches

    def at(self, phase: str, micro: int = -1) -> None:
        self.where = Where(phase, self._step, self._part, micro, self._window)
        self.moved = time.monotonic()

    def backward(self) -> None:
        """The forward of the current micro-batch gave its loss: its backward follows."""
        self.at(BACKWARD, self.where.micro)
