"""Stopping early on a signal, together, with a checkpoint; and SLURM's requeue.

SIGUSR1 (SLURM's warning before the time limit) and SIGTERM (preemption, scancel) are caught on any
process and raise Accelerate's trigger; every process then stops at the same step boundary, the
trainer writes a checkpoint, and under SLURM the main process requeues the job.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator

from disttrain.parent_death import signal_on_parent_death

# SIGUSR1: SLURM's warning before the time limit; SIGTERM: preemption, scancel, a launcher that
# ended (see stop_with_the_launcher); SIGINT: Ctrl-C, which `accelerate launch` passes on; SIGHUP:
# the terminal or SSH session went away.
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

# Exit statuses of train.py (documented in the README). Through `accelerate launch`, torch's agent
# reports any non-zero rank as 1: the run directory's status.json says which it was. 4: ended by the
# watchdog (disttrain.resilience.watchdog): no progress within its limits, no checkpoint written.
EXIT_FINISHED, EXIT_FAILED, EXIT_REFUSED, EXIT_STOPPED, EXIT_STALLED = 0, 1, 2, 3, 4

DUPLICATE_S = 1.0  # a second signal sooner than this after the first is the same request


def slurm_job() -> str:
    """This SLURM job as `scontrol` names it (`<array job>_<task>` in an array); empty outside SLURM."""
    array_job, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array_job and task:
        return f"{array_job}_{task}"
    return os.environ.get("SLURM_JOB_ID", "")


@contextlib.contextmanager
def stop_signals_caught(
    on_signal: Callable[[str], None], wakeup_fd: int | None = None, at_once: Callable[[], None] | None = None
) -> Iterator[None]:
    """Inside the block, a stop signal calls `on_signal(name)` instead of ending the process; a
    second one stops at once (KeyboardInterrupt), so that nobody is trapped in a long step.

    One event can deliver a signal twice within milliseconds (a launcher's end: its ranks each
    get two SIGTERMs); a repeat within DUPLICATE_S of the first is taken as the same request.
    The main thread runs these handlers only between bytecodes, never inside a collective: the
    watchdog hears of each signal at once through `wakeup_fd` (non-blocking; `signal.set_wakeup_fd`
    writes the signal's number there), and through `at_once()` that the main thread itself stops at
    once on a second one.
    """
    caught: list[tuple[str, float]] = []

    def catch(signum: int, frame: object) -> None:
        name = signal.Signals(signum).name
        if caught:
            if time.monotonic() - caught[0][1] < DUPLICATE_S:
                return
            if at_once is not None:
                at_once()
            raise KeyboardInterrupt(f"{name} after {caught[0][0]}: stopped at once, without a checkpoint")
        caught.append((name, time.monotonic()))
        on_signal(name)

    with _stop_signals_handled(catch) as installed:
        previous_fd = signal.set_wakeup_fd(wakeup_fd, warn_on_full_buffer=False) if installed and wakeup_fd else None
        try:
            yield
        finally:
            if previous_fd is not None:
                signal.set_wakeup_fd(previous_fd)


@contextlib.contextmanager
def teardown_signals(status: int) -> Iterator[None]:
    """While a run that is over (finished, or stopped with its checkpoint) only releases what it
    holds, a stop signal ends the process at once with the status it earned, not the signal's 143."""

    def end(signum: int, frame: object) -> None:
        print(f"{signal.Signals(signum).name} while releasing the run's resources: exit status {status}", flush=True)
        os._exit(status)

    with _stop_signals_handled(end):
        yield


@contextlib.contextmanager
def _stop_signals_handled(handler: Callable[[int, object], None]) -> Iterator[bool]:
    """`handler` for every stop signal inside the block, the previous handlers after it; yields
    whether it was installed (only the main thread may: elsewhere signals are left to their owner)."""
    try:
        previous = {s: signal.signal(s, handler) for s in STOP_SIGNALS}
    except ValueError:  # not the main thread
        previous = {}
    try:
        yield bool(previous)
    finally:
        for s, old in previous.items():
            signal.signal(s, old)


def requeue(job: str, reason: str) -> str:
    """`scontrol requeue` the job, unless it was cancelled (scancel): after `reason`, a stop signal
    or a stall (the watchdog's), the job resumes from its newest checkpoint.

    Preemption (SIGTERM within the partition's GraceTime) and the warning before the time limit
    (SIGUSR1) requeue; a job whose tasks end first counts as completed, so the job must do it.
    SLURM then sends SIGTERM to the job, this call's process included: the call runs with SIGTERM
    ignored (main thread) or blocked (another thread: the watchdog's), and its child inherits that.
    """
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN) if main else None
    if not main:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        shown = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True)
        fields = dict(f.split("=", 1) for f in shown.stdout.split() if "=" in f)
        # While its tasks still run, a cancelled job reads COMPLETING; a preempted one RUNNING, with
        # the time of its preemption.
        if fields.get("JobState") in ("CANCELLED", "COMPLETING") and fields.get("PreemptTime") == "None":
            return f"job {job} was cancelled: not requeued"
        done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    except FileNotFoundError:
        return f"could not requeue job {job}: no scontrol on PATH"
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)
        else:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
    if done.returncode != 0:
        return f"scontrol requeue {job} failed ({(done.stderr or done.stdout).strip()})"
    return f"requeued job {job}, which resumes from its newest checkpoint"


def stop_reason(signal_name: str | None) -> str:
    """What stopped the run, as its last line says it."""
    reason = signal_name or "a signal on another process"
    return f"{reason} (the launcher ended)" if launcher_gone() else reason


def how_to_continue(checkpoint: str, run_dir: str, reason: str) -> str:
    """After a stop's checkpoint: requeue under SLURM (main process only), else the command to resume."""
    job = slurm_job()
    if job:
        return requeue(job, reason)
    return f"continue with resume={checkpoint}, or the same command with run_name={os.path.basename(run_dir)}"


_LAUNCHER: list[int] = []  # the launcher's pid, when this process asked to hear of its end


def stop_with_the_launcher() -> None:
    """A rank of `accelerate launch` (torch's agent) gets SIGTERM when the launcher ends, and so
    stops at the next step with a checkpoint, instead of training on as an orphan.

    The agent starts every rank in a session of its own, so a signal that ends the launcher (SIGUSR1
    sent to it alone, SIGKILL) would otherwise never reach the ranks. Linux only (prctl).
    """
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    launcher = os.getppid()
    if signal_on_parent_death(signal.SIGTERM):
        _LAUNCHER.append(launcher)


def launcher_gone() -> bool:
    """Whether this rank's launcher ended (after stop_with_the_launcher)."""
    return bool(_LAUNCHER) and os.getppid() != _LAUNCHER[0]
