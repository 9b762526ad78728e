"""A watchdog on every process: a run that stops making progress ends, with a report, in bounded time.

The training loop records where it is (progress.py); a thread of this process looks every beat. It
ends the process, with exit status 4 (preemption.EXIT_STALLED), when:
- nothing moved for `stall_timeout_s` (any phase) or `data_timeout_s` (waiting for a micro-batch);
- a stop signal came and the process then made no progress for `stop_grace_s` before reaching the
  step boundary (the stop's checkpoint would never be written);
- another process posted its failure on the job's board (board.py): this one ends too, naming it,
  with that process's status (4 stalled, 1 failed), instead of waiting in a collective for it.
Before it ends it writes `<run dir>/stalls/rank<k>.txt` (report.py), kills its DataLoader workers,
and, on the main process (or the lowest process still heard from, if the main one is silent),
marks status.json and prints the last line: which process stalled, where, and the report's path.

Signals reach the thread through a wakeup file descriptor: the main thread runs a signal's Python
handler only between bytecodes, never while it waits inside a collective. If the watchdog thread
itself cannot run (C code holding the GIL), faulthandler prints every thread's stack and ends the
process with status 1 (`Limits.backstop_s`: the longest limit and some seconds).
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import select
import signal
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from disttrain.preemption import DUPLICATE_S, EXIT_FAILED, EXIT_STALLED, STOP_SIGNALS, requeue, slurm_job
from disttrain.resilience.board import Board
from disttrain.resilience.progress import DATA, Progress, Where
from disttrain.resilience.report import (
    STALLS,
    build_report,
    end_silent_peers,
    heartbeat,
    held_up_by,
    peers_lines,
    silent_ranks,
    write_report,
)
from disttrain.run_status import read_status, stalled_at, write_status

AT_ONCE_S = 2.0  # after a second stop signal, the main thread's own stop gets this long first
ENDING_S = 30.0  # what an ending (report, board, status) may take before the main thread goes on


class CollectiveFailure(RuntimeError):
    """A collective failed: another process died or hung (its board notice may say which)."""


def exit_after(seconds: float) -> None:
    """Print every thread's stack and end the process with status 1 after `seconds`, unless cancelled
    (faulthandler.cancel_dump_traceback_later) or re-armed; runs even while C code holds the GIL."""
    faulthandler.dump_traceback_later(seconds, exit=True, file=_fault_stream())


def _fault_stream() -> Any:
    """sys.stderr, unless it is kept in memory (pytest's capture, a notebook): then the process's own."""
    for stream in (sys.stderr, sys.__stderr__):
        try:
            stream.fileno()
        except (AttributeError, ValueError, OSError):  # io.UnsupportedOperation is an OSError
            continue
        return stream
    return open(os.devnull, "w")  # no stderr at all: the exit still matters


@dataclass(frozen=True)
class Limits:
    stall_s: float  # stall_timeout_s: no progress in any phase
    data_s: float  # data_timeout_s: no micro-batch
    stop_grace_s: float  # stop_grace_s: no progress after a stop signal, before the step boundary

    @property
    def beat_s(self) -> float:
        """How often the watchdog looks (and beats on the board): a tenth of the shortest limit."""
        on = [s for s in (self.stall_s, self.data_s, self.stop_grace_s) if s > 0]
        return min(5.0, max(0.2, min(on) / 10)) if on else 5.0

    @property
    def backstop_s(self) -> float:
        """How long this thread may go without looking (C code holding the GIL) before faulthandler,
        which needs no GIL, prints every thread's stack and ends the process: past the longest limit,
        with room for a late beat. 0 with every limit off."""
        on = [s for s in (self.stall_s, self.data_s, self.stop_grace_s) if s > 0]
        return max(on) + 5 * self.beat_s + 10 if on else 0.0

    @property
    def stale_s(self) -> float:
        """A process not heard from for this long is silent: stopped, dead, or stuck with the GIL."""
        return max(2.0, 5 * self.beat_s)


@dataclass
class Ending:
    """Why a process ends: `state` stalled or failed, `rank` the process it is about, `line` what
    happened to that process in one sentence (status.json's detail, the main process's last line)."""

    state: str
    rank: int
    line: str
    where: Where
    report: str = ""  # that process's report, once written
    culprit: tuple[int, str] | None = None  # (rank, phase) of the process that held this one up

    @property
    def exit_status(self) -> int:
        return EXIT_STALLED if self.state == "stalled" else EXIT_FAILED

    def notice(self) -> dict:
        return {
            "state": self.state,
            "rank": self.rank,
            "line": self.line,
            "where": self.where,
            "report": self.report,
            "culprit": self.culprit,
        }

    @classmethod
    def from_notice(cls, notice: dict) -> Ending:
        culprit = tuple(notice["culprit"]) if notice["culprit"] else None
        return cls(notice["state"], notice["rank"], notice["line"], Where(*notice["where"]), notice["report"], culprit)  # type: ignore[arg-type]


class Watchdog:
    """Watches `progress` on process `rank` of `world` during `fit`; see the module's docstring."""

    def __init__(
        self,
        limits: Limits,
        progress: Progress,
        rank: int,
        world: int,
        steps: int,
        run_dir: str,
        board_key: str,
    ):
        self.limits, self.progress, self.rank, self.world, self.steps = limits, progress, rank, world, steps
        self.run_dir = run_dir
        self.workers: Any = None  # the DataLoader's workers while they run (data.loader.Workers)
        self.board = Board.for_job(board_key, rank, world, limits.beat_s, self._heartbeat)
        self._signals_r, self.signal_fd = os.pipe()
        os.set_blocking(self.signal_fd, False)
        self._stop_signal: tuple[str, float] | None = None  # the first stop signal and when it came
        self._second_signal: tuple[str, float] | None = None
        self._main_stops = False  # the main thread stops at once on a second stop signal by itself
        self._boundary_reached = False  # the last step boundary: nothing for a stop signal to wait for
        self._notice_seen: float | None = None
        self._failing = False  # the main thread is handling an exception of its own
        self._done = threading.Event()
        self._ending = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="disttrain-watchdog", daemon=True)

    # ------------------------------------------------------------------ life cycle

    @contextlib.contextmanager
    def running(self) -> Iterator[Watchdog]:
        """Watch while the block runs. An exception leaving it is posted on the board (the other
        processes end, naming this one), unless it is a collective's failure and another process
        posted first: then this process ends too, naming that one."""
        if self.board is not None:
            self.board.start()
        self._thread.start()
        if self.limits.backstop_s:  # armed now: the main thread may hold the GIL before the thread first looks
            exit_after(self.limits.backstop_s)
        try:
            yield self
        except BaseException as e:
            self._failed(e)
            raise
        finally:
            # If the thread is ending this process (report, status, exit), that is the story told: wait
            # for it. Once held, the thread can no longer start ending it.
            self._ending.acquire(timeout=ENDING_S)
            self._done.set()
            os.write(self.signal_fd, b"\0")  # wakes the thread from its wait (0 is no signal)
            self._thread.join(timeout=2 * self.limits.beat_s + 1)
            faulthandler.cancel_dump_traceback_later()
            if self.board is not None:
                self.board.stop()
            os.close(self._signals_r)
            os.close(self.signal_fd)

    def main_thread_stops(self) -> None:
        """The main thread took a second stop signal itself: it stops at once, unhelped."""
        self._main_stops = True

    def boundary_reached(self) -> None:
        """The run reached the step boundary where it stops (a stop signal's, or its last step's):
        what follows (the checkpoint, evaluation, weights) runs under the stall limit alone."""
        self._boundary_reached = True

    def _failed(self, error: BaseException) -> None:
        self._failing = True
        if self.board is None:
            return
        if isinstance(error, CollectiveFailure):
            notice = self.board.read_notice(wait_s=2.0)
            if notice is not None and notice["rank"] != self.rank:
                own = "".join(traceback.format_exception(error)).rstrip()
                self._end(Ending.from_notice(notice), f"this process's own error, which followed:\n{own}")
        where = self.progress.where
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        line = f"process {self.rank} failed in {where.describe(self.steps)}: {type(error).__name__}"
        line += f": {first[:400]}" if first else ""
        self.board.post(Ending("failed", self.rank, line, where).notice(), wait_s=2.0)

    # ------------------------------------------------------------------ the watchdog's thread

    def _heartbeat(self) -> dict:
        return heartbeat(self.rank, self.progress.where, time.monotonic() - self.progress.moved)

    def _run(self) -> None:
        while not self._done.is_set():
            readable, _, _ = select.select([self._signals_r], [], [], self.limits.beat_s)
            if self._done.is_set():
                return
            if readable:
                self._heard(os.read(self._signals_r, 512))
            ending = self._due()
            if ending is not None:
                self._end(ending)
            if self.limits.backstop_s:  # C code holding the GIL would keep this thread from looking again
                exit_after(self.limits.backstop_s)

    def _heard(self, signals: bytes) -> None:
        now = time.monotonic()
        for number in signals:
            if number not in STOP_SIGNALS:
                continue
            name = signal.Signals(number).name
            if self._stop_signal is None:
                self._stop_signal = (name, now)
            elif self._second_signal is None and now - self._stop_signal[1] >= DUPLICATE_S:
                self._second_signal = (name, now)

    def _due(self) -> Ending | None:
        """Why this process must end now, if it must."""
        now = time.monotonic()
        where, idle = self.progress.where, now - self.progress.moved
        notice = self.board.notice if self.board is not None else None
        if notice is not None and notice["rank"] != self.rank and not self._failing:
            # The main thread may be failing for the same reason (an error every process raises):
            # it gets a moment to do so in order before this thread ends the process.
            self._notice_seen = self._notice_seen or now
            if now - self._notice_seen > max(5.0, 3 * self.limits.beat_s):
                return Ending.from_notice(notice)
        place = where.describe(self.steps)
        again = self._second_signal
        if again is not None and now - again[1] > AT_ONCE_S and not self._main_stops:
            first = self._stop_signal[0]  # type: ignore[index]
            line = f"process {self.rank} stopped at once in {place} on {again[0]} after {first}, without a checkpoint"
            return Ending("failed", self.rank, line, where)
        grace = self.limits.stop_grace_s
        if self._stop_signal is not None and grace and not self._boundary_reached:
            name, at = self._stop_signal  # type: ignore[misc]
            since = now - max(at, self.progress.moved)
            if since > grace:
                line = (
                    f"process {self.rank} got {name} {now - at:.0f}s ago and made no progress since, in {place} "
                    f"({since:.0f}s, above stop_grace_s={grace:g}): stopped without a checkpoint"
                )
                return Ending("stalled", self.rank, line, where)
        limit, key = (
            (self.limits.data_s, "data_timeout_s") if where.phase == DATA else (self.limits.stall_s, "stall_timeout_s")
        )
        if limit and idle > limit:
            line = f"process {self.rank} made no progress for {idle:.0f}s in {place}, above {key}={limit:g}"
            return Ending("stalled", self.rank, line, where)
        return None

    def _end(self, ending: Ending, detail: str = "") -> None:
        """Report, tell the others, mark the run, and end this process (never returns)."""
        with self._ending:
            own = ending.rank == self.rank
            beats = self.board.heartbeats(wait_s=2.0) if self.board is not None else {self.rank: self._heartbeat()}
            if own and beats:
                self._blame(ending, beats)
            what = ending.line if own else f"process {self.rank} ends because {ending.line}"
            peers = peers_lines(beats, self.world, self.steps, self.limits.stale_s, getattr(self.board, "error", ""))
            workers = self.workers.describe(stacks=True) if self.workers is not None else []
            text = build_report(what, self.rank, self.world, self.progress.where, self.steps, peers, workers, detail)
            path = _written(self.run_dir, self.rank, text)
            if own:
                ending.report = path
                if self.board is not None:  # another process may have posted first: it is the cause
                    first = self.board.post(ending.notice(), wait_s=2.0)
                    ending = Ending.from_notice(first) if first is not None else ending
            silent = silent_ranks(beats, self.world, self.limits.stale_s) if beats else []
            if self.rank == 0 or (0 in silent and min(set(range(self.world)) - set(silent)) == self.rank):
                self._mark(ending)  # the main process, or the first one still heard from if it is silent
            else:
                print(f"{what}; report {path}", file=sys.stderr, flush=True)
            for line in end_silent_peers(beats or {}, silent):
                print(f"process {self.rank}: {line}", file=sys.stderr, flush=True)
            if self.workers is not None:
                self.workers.kill()
            sys.stdout.flush()
            os._exit(ending.exit_status)

    def _blame(self, ending: Ending, beats: dict[int, dict]) -> None:
        """Name the process that held this one up, when another one did."""
        suspects, why = held_up_by(beats, self.world, self.limits.stale_s)
        others = [r for r in suspects if r != self.rank]
        if not others:
            return
        beat = beats.get(others[0])
        where = Where(*beat["where"]) if beat else None
        seen = f"; last seen in {where.describe(self.steps)}" if where else ""
        ranks = ", ".join(map(str, others))
        ending.line += f"; held up by rank{'s' if len(others) > 1 else ''} {ranks} ({why}{seen})"
        ending.culprit = (others[0], where.phase if where else "")

    def _mark(self, ending: Ending) -> None:
        """status.json and the last line. A failed process leaves its traceback, not a report. Under
        SLURM a stall requeues the job (it resumes from its newest checkpoint), unless the attempt
        before stalled at the same step: then the cause is in the run, and a requeue would loop."""
        rank, phase = ending.culprit or (ending.rank, ending.where.phase)
        step = ending.where.step
        before = read_status(self.run_dir)
        with contextlib.suppress(OSError):  # the disk may be the cause: the line below still says it
            write_status(self.run_dir, ending.state, step, ending.line, rank=rank, phase=phase, report=ending.report)
        reports = os.path.join(self.run_dir, STALLS)
        said = f"report {ending.report} (the others' beside it)" if ending.report else f"reports in {reports}"
        job = slurm_job()
        if job and ending.state == "stalled":
            if stalled_at(before) == step:
                said += f"; job {job} not requeued: its attempt before stalled at this step too"
            else:
                said += f"; {requeue(job, 'stall')}"
        print(f"{ending.state}: {ending.line}; {said}; exit status {ending.exit_status}", file=sys.stderr, flush=True)


def _written(run_dir: str, rank: int, text: str) -> str:
    try:
        return write_report(run_dir, rank, text)
    except OSError as e:  # a full or read-only disk: the report goes to stderr instead
        print(text, file=sys.stderr, flush=True)
        return f"(not written: {e.strerror or e}; printed above)"
