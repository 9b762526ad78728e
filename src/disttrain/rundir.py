"""Where a run writes: one directory per run, named on the main process and owned by one run.

The main process takes the directory's lock (`run.lock`: host, pid, SLURM job) before writing
anything there. A second run is refused, naming the holder; a lock whose process is gone (same
host) or that a requeued SLURM job left is taken over, and the run says so. `resume=never` into a
directory that holds checkpoints is refused rather than mixing two runs' checkpoints. A worker group
that `accelerate launch --max_restarts` started again finds the directory of the group it replaces.
"""

from __future__ import annotations

import datetime
import json
import os
import socket

from disttrain.checkpoint import complete_checkpoints
from disttrain.config import Config, to_yaml
from disttrain.engines.base import Engine
from disttrain.preemption import slurm_job
from disttrain.restarts import launcher_id, launcher_started, restart_count, under_elastic_launcher

LOCK = "run.lock"
LAUNCHER = ".launcher"  # which launcher's worker groups write here: its restarts find the directory


class RunDirError(RuntimeError):
    """The run directory cannot be this run's; the message names the holder or the conflict and the fix."""


def run_name(cfg: Config) -> str:
    """`run_name`, else under SLURM `<recipe>-<job>` (so a requeued job finds its own checkpoints),
    else empty: the main process then picks `<recipe>-<timestamp>`."""
    if cfg.run_name:
        return cfg.run_name
    job = slurm_job()
    return f"{cfg.recipe_section}-{job}" if job else ""


def make_run_dir(cfg: Config, engine: Engine) -> tuple[str, str]:
    """Create and lock the run directory; every process gets its path and the lock's note (a
    takeover to mention, else empty), or RunDirError on every process."""
    shared = [run_name(cfg), "", ""]  # name, note, error
    if engine.is_main_process:
        run_dir = cfg.output_dir
        try:
            named_by_launcher = not shared[0] and under_elastic_launcher()
            shared[0] = shared[0] or _new_or_restarted_name(cfg)
            run_dir = os.path.join(cfg.output_dir, shared[0])
            os.makedirs(run_dir, exist_ok=True)
            shared[1] = take_lock(run_dir)
            if named_by_launcher:  # a given run_name or SLURM job already leads a restart here
                with open(os.path.join(run_dir, LAUNCHER), "w") as f:
                    f.write(launcher_id())
            if cfg.resume == "never" and restart_count() == 0 and complete_checkpoints(run_dir):
                release_lock(run_dir)
                raise RunDirError(
                    f"run directory {run_dir} holds checkpoints of an earlier run and resume=never would mix this "
                    f"run's with them; choose another run_name, or delete {os.path.join(run_dir, 'checkpoints')}"
                )
        except RunDirError as e:
            shared[2] = str(e)
        except OSError as e:
            shared[2] = f"cannot create run directory {run_dir}: {e.strerror or e}"
    shared = engine.share_from_main(shared)
    if shared[2]:
        raise RunDirError(shared[2])
    return os.path.join(cfg.output_dir, shared[0]), shared[1]


def _new_or_restarted_name(cfg: Config) -> str:
    """`<recipe>-<time>`, the time of the launcher's start under `accelerate launch` (every attempt
    of its worker group computes the same), else of this run's; `-1`, `-2`... when taken. A restarted
    group takes the directory its launcher's earlier attempt marked."""
    started = (launcher_started() if under_elastic_launcher() else None) or datetime.datetime.now()
    stamp = f"{cfg.recipe_section}-{started:%Y%m%d-%H%M%S}"
    me = launcher_id() if restart_count() else None  # a first attempt has no earlier directory to find
    for name in (f"{stamp}{suffix}" for suffix in ["", *(f"-{i}" for i in range(1, 1000))]):
        path = os.path.join(cfg.output_dir, name)
        if not os.path.exists(path) or _read(os.path.join(path, LAUNCHER)) == me:
            return name
    raise RunDirError(f"1000 run directories named {stamp}-* in {cfg.output_dir}: give run_name=...")


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def write_run_config(run_dir: str, cfg: Config, engine: Engine) -> None:
    """The resolved config as config.yaml; after a resume was accepted, so a refused one leaves the
    directory as it was."""
    if engine.is_main_process:
        path = os.path.join(run_dir, "config.yaml")
        with open(path + ".tmp", "w") as f:
            f.write(to_yaml(cfg))
        os.replace(path + ".tmp", path)
    engine.wait_for_everyone()


def _me() -> dict[str, object]:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "slurm_job": slurm_job(),
        "since": datetime.datetime.now().isoformat(timespec="seconds"),
    }


def take_lock(run_dir: str) -> str:
    """Take the run directory's lock; returns a note when an abandoned lock was taken over."""
    path = os.path.join(run_dir, LOCK)
    me = _me()
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return _take_over(path, run_dir, me)
    with os.fdopen(fd, "w") as f:
        json.dump(me, f)
    return ""


def _take_over(path: str, run_dir: str, me: dict[str, object]) -> str:
    try:
        with open(path) as f:
            holder = json.load(f)
        host, pid, job = str(holder["host"]), int(holder["pid"]), str(holder.get("slurm_job", ""))
    except (OSError, ValueError, KeyError, TypeError):
        holder, host, pid, job = None, "?", -1, ""
    if host == me["host"] and pid == me["pid"]:
        return ""  # an earlier run in this process (a notebook, a test) that was not closed
    if holder is None:
        why = "an unreadable lock"
    elif job and job == me["slurm_job"]:
        why = f"the lock of SLURM job {job} (this job, requeued)"
    elif host == me["host"] and not _alive(pid):
        why = f"the lock of process {pid} on {host}, which is gone"
    else:
        raise RunDirError(
            f"run directory {run_dir} is in use by process {pid} on {host} (since {holder.get('since', '?')}); "
            f"wait for that run to end, or choose another run_name (if it is gone, delete {path})"
        )
    with open(path + f".{me['pid']}", "w") as f:
        json.dump(me, f)
    os.replace(path + f".{me['pid']}", path)
    return f"run directory {run_dir}: took over {why}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def release_lock(run_dir: str) -> None:
    """Drop the lock if this process holds it (main process, at the end of the run)."""
    path = os.path.join(run_dir, LOCK)
    try:
        with open(path) as f:
            mine = json.load(f).get("pid") == os.getpid()
    except (OSError, ValueError):
        return
    if mine:
        os.remove(path)
