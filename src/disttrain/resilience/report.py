"""The stall report a process writes before it ends: `<run dir>/stalls/rank<k>.txt`.

What ended it and where it was; where every process of the job was by its last heartbeat, and which
of them held the others up; its DataLoader workers (alive or how they ended, their last words and
stacks); every thread's Python stack. Written in one go, atomically, by the process itself.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import signal
import socket
import sys
import threading
import time
import traceback

from disttrain.resilience.progress import DOING, Where

STALLS = "stalls"


def report_path(run_dir: str, rank: int) -> str:
    return os.path.join(run_dir, STALLS, f"rank{rank}.txt")


def write_report(run_dir: str, rank: int, text: str) -> str:
    """Write the report; an earlier attempt's report of this rank is kept beside it, dated."""
    path = report_path(run_dir, rank)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if os.path.exists(path):
        stamp = datetime.datetime.fromtimestamp(os.path.getmtime(path)).strftime("%Y%m%d-%H%M%S")
        os.replace(path, path[: -len(".txt")] + f".{stamp}.txt")
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)
    return path


def heartbeat(rank: int, where: Where, idle_s: float) -> dict:
    """What a process tells the others of itself (see board.py), every beat."""
    return {
        "rank": rank,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": process_start(os.getpid()),
        "where": list(where),
        "idle_s": round(idle_s, 1),
        "time": time.time(),
    }


def process_start(pid: int) -> str:
    """When process `pid` started (clock ticks since boot, Linux): a pid with another start is
    another process. Empty where unknown."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def end_silent_peers(beats: dict[int, dict], silent: list[int]) -> list[str]:
    """SIGKILL the silent processes (stopped, or stuck with the GIL held) that run on this host:
    they cannot end by themselves, and the job is over. Returns what was done, a line each."""
    done = []
    for r in silent:
        beat = beats.get(r)
        if beat is None or beat["host"] != socket.gethostname() or not beat.get("started"):
            continue
        if process_start(beat["pid"]) != beat["started"]:
            continue  # gone already, or its pid now belongs to another process
        with contextlib.suppress(ProcessLookupError):
            os.kill(beat["pid"], signal.SIGKILL)
            done.append(f"killed rank {r} (pid {beat['pid']}), silent on this host")
    return done


def silent_ranks(beats: dict[int, dict], world: int, stale_s: float) -> list[int]:
    """The processes not heard from for `stale_s`: stopped, dead, or so stuck that even their
    watchdog cannot beat (C code holding the GIL)."""
    now = time.time()
    return [r for r in range(world) if r not in beats or now - beats[r]["time"] > stale_s]


def held_up_by(beats: dict[int, dict], world: int, stale_s: float) -> tuple[list[int], str]:
    """The processes that hold the others up, and why: the silent ones, else those behind the others."""
    silent = silent_ranks(beats, world, stale_s)
    if silent:
        return silent, f"not heard from for over {stale_s:.0f}s: stopped (SIGSTOP), dead, or stuck with the GIL held"
    positions = {r: Where(*b["where"]).position() for r, b in beats.items()}
    lowest = min(positions.values())
    behind = [r for r, p in positions.items() if p == lowest]
    if len(behind) < len(positions):
        return behind, "behind the others, who wait for them in a collective"
    return [], "every process is at the same place: a collective that never completes, or the same hang on all"


def peers_lines(beats: dict[int, dict] | None, world: int, steps: int, stale_s: float, error: str) -> list[str]:
    if beats is None:
        return [f"  the job's store did not answer{f' ({error})' if error else ''}: no view of the other processes"]
    now = time.time()
    lines = []
    for r in range(world):
        if r not in beats:
            lines.append(f"  rank {r}: no heartbeat")
            continue
        b = beats[r]
        where = Where(*b["where"])
        lines.append(
            f"  rank {r}: host {b['host']} pid {b['pid']}: {where.describe(steps)}, no progress for "
            f"{b['idle_s']:.1f}s, heard {now - b['time']:.1f}s ago"
        )
    if world > 1:
        suspects, why = held_up_by(beats, world, stale_s)
        lines.append(f"  held up by rank(s) {', '.join(map(str, suspects))}: {why}" if suspects else f"  {why}")
    return lines


def thread_stacks() -> list[str]:
    """Every other thread's Python stack, the innermost call last (this one is writing the report)."""
    names = {t.ident: t.name for t in threading.enumerate()}
    lines = []
    for ident, frame in sys._current_frames().items():
        if ident == threading.get_ident():
            continue
        lines.append(f"thread {names.get(ident, ident)}:")
        lines += [line.rstrip("\n") for line in traceback.format_stack(frame)]
    return lines


def build_report(
    what: str,
    rank: int,
    world: int,
    where: Where,
    steps: int,
    peers: list[str],
    workers: list[str],
    detail: str = "",
) -> str:
    lines = [
        f"disttrain stall report: rank {rank} of {world}, host {socket.gethostname()}, pid {os.getpid()}, "
        f"{datetime.datetime.now().isoformat(timespec='seconds')}",
        f"what: {what}",
        f"this process was in {where.describe(steps)}: {DOING[where.phase]}",
    ]
    if detail:
        lines += ["", detail.rstrip()]
    lines += ["", "the job's processes, by their last heartbeat:", *peers]
    lines += ["", f"DataLoader workers of this process ({len([w for w in workers if w.startswith('worker')])}):"]
    lines += [f"  {w}" for w in workers] or ["  none (micro-batches load inline)"]
    lines += ["", f"Python stacks of this process's threads (but {threading.current_thread().name}, writing this):"]
    lines += [*thread_stacks(), ""]
    return "\n".join(lines)
