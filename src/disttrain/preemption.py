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
from collections.abc import Callable, Iterator

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


def slurm_job() -> str:
    """This SLURM job as `scontrol` names it (`<array job>_<task>` in an array); empty outside SLURM."""
    array_job, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array_job and task:
        return f"{array_job}_{task}"
    return os.environ.get("SLURM_JOB_ID", "")


@contextlib.contextmanager
def stop_signals_caught(on_signal: Callable[[str], None]) -> Iterator[None]:
    """Inside the block, a stop signal calls `on_signal(name)` instead of ending the process."""

    def catch(signum: int, frame: object) -> None:
        on_signal(signal.Signals(signum).name)

    try:
        previous = {s: signal.signal(s, catch) for s in STOP_SIGNALS}
    except ValueError:  # not the main thread: leave signals to whoever owns them
        previous = {}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def requeue(job: str, reason: str) -> str:
    """`scontrol requeue` the job, unless a SIGTERM came from its cancellation (scancel).

    Preemption (SIGTERM within the partition's GraceTime) and the warning before the time limit
    (SIGUSR1) requeue; a job whose tasks end first counts as completed, so the job must do it.
    SLURM then sends SIGTERM to the job, this call's process included: the call runs with SIGTERM
    ignored (the child inherits that).
    """
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        if reason == "SIGTERM":
            shown = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True)
            state = next((f.split("=", 1)[1] for f in shown.stdout.split() if f.startswith("JobState=")), "")
            if state == "CANCELLED":
                return f"job {job} was cancelled: not requeued"
        done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    except FileNotFoundError:
        return f"could not requeue job {job}: no scontrol on PATH"
    finally:
        signal.signal(signal.SIGTERM, previous)
    if done.returncode != 0:
        return f"scontrol requeue {job} failed ({(done.stderr or done.stdout).strip()})"
    return f"requeued job {job}, which resumes from it"


def how_to_continue(checkpoint: str, run_dir: str, reason: str) -> str:
    """After a stop's checkpoint: requeue under SLURM (main process only), else the command to resume."""
    job = slurm_job()
    if job:
        return requeue(job, reason)
    return f"continue with resume={checkpoint}, or the same command with run_name={os.path.basename(run_dir)}"
