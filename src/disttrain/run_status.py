"""`status.json` in a run directory: how the run's last attempt ended, and at which step.

What a wrapper reads where `accelerate launch` folds every non-zero exit status into 1: `finished`,
`running` (written at each log line), `stopped` (by a signal, resumable), `failed`, `stalled` (ended by the watchdog, resumable from the
newest checkpoint) or `refused` (its resume was refused: nothing trained, the step is the earlier
attempt's); a stall, or a failure that ended the other processes, adds the `rank`, `phase`
and `report` it was about; `time` is when it was written, `restarts` how often `accelerate launch
--max_restarts` restarted the worker group. A leaf: no torch, so that a process can write it at any moment.
"""

from __future__ import annotations

import json
import os
import time

from disttrain.restarts import restart_count

STATUS = "status.json"


def write_status(run_dir: str, state: str, step: int, detail: str = "", **more: object) -> None:
    """Write the run's status atomically. The main process writes it, or the watchdog of the lowest
    process still heard from when the main one is silent: each through a file of its own first."""
    path = os.path.join(run_dir, STATUS)
    tmp = f"{path}.{os.getpid()}.tmp"
    restarts = {"restarts": restart_count()} if restart_count() else {}
    with open(tmp, "w") as f:
        json.dump({"state": state, "step": step, "detail": detail, "time": time.time(), **restarts, **more}, f)
    os.replace(tmp, path)


def stalled_at(status: dict) -> int | None:
    """The step an earlier attempt stalled at: its own status, or what the attempt after it carries
    over while it runs (a second stall there ends the SLURM requeues instead of looping)."""
    if status.get("state") == "stalled":
        return status.get("step")
    return status.get("stalled_at")


def read_status(run_dir: str) -> dict:
    """The status an earlier attempt left (empty if there is none, or it cannot be read)."""
    try:
        with open(os.path.join(run_dir, STATUS)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}
