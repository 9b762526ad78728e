"""Is this process group a restart of an earlier one by the same launcher, and which launcher is it?

`accelerate launch --max_restarts N` (torch's elastic agent) starts the worker group again when a
process fails, up to N times, and tells each process which attempt it is
(`TORCHELASTIC_RESTART_COUNT`). A restarted group must find the run directory of the group it
replaces, so a run without `run_name` is named after the launcher (the ranks' parent process: its
start time), which every attempt shares, rather than after its own start. A leaf: no torch.
"""

from __future__ import annotations

import datetime
import os
import socket


def restart_count() -> int:
    """0 for the first attempt (and outside torch's launcher), k for the k-th restart."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


def max_restarts() -> int:
    return int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0") or 0)


def under_elastic_launcher() -> bool:
    return "TORCHELASTIC_RESTART_COUNT" in os.environ


def launcher_started() -> datetime.datetime | None:
    """When the launcher (this process's parent) started, from /proc; None where it cannot be read."""
    try:
        with open(f"/proc/{os.getppid()}/stat") as f:
            # the fields after the command name (which may hold spaces), from the 3rd: starttime is the 22nd
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime "))
    except (OSError, ValueError, IndexError, StopIteration):
        return None
    return datetime.datetime.fromtimestamp(boot + ticks / os.sysconf("SC_CLK_TCK"))


def launcher_id() -> str:
    """The launcher this group belongs to, the same for each of its attempts: host, pid, start."""
    started = launcher_started()
    return f"{socket.gethostname()}:{os.getppid()}:{started.timestamp() if started else ''}"


def attempt_words() -> str:
    """'restart 1 of 3' for a restarted group, '' for a first attempt."""
    count = restart_count()
    return f"restart {count} of {max_restarts()}" if count else ""
