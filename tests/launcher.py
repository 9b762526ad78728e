"""The one way tests run train.py as a user would: under a real launcher, in fresh processes."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable

from tests.dist import free_port

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ACCELERATE = os.path.join(os.path.dirname(sys.executable), "accelerate")
PYTHON = [sys.executable]


def accelerate(config: str = "configs/accelerate/ddp.yaml") -> list[str]:
    """`accelerate launch` with an Accelerate config file (2 CPU processes for ddp.yaml), on a free port."""
    return [ACCELERATE, "launch", "--config_file", config, "--main_process_port", str(free_port())]


def _command(launcher: list[str], train_args: tuple[str, ...]) -> list[str]:
    chosen = any(a.startswith(("config=", "recipe=")) for a in train_args)
    config = [] if chosen else ["config=configs/debug.yaml"]
    return [*launcher, "train.py", *config, *train_args]


def launch(launcher: list[str], *train_args: str, timeout: float = 300, ok: bool = True) -> subprocess.CompletedProcess:
    """Run train.py under `launcher` (debug.yaml unless a config or recipe is given) and wait for it."""
    try:
        result = subprocess.run(
            _command(launcher, train_args),
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"no result after {timeout}s; output so far:\n{e.stdout}\n{e.stderr}") from e
    if ok:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants. torch's launcher starts each rank in a session of its own, so
    killing the launcher's process group would leave the ranks running."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue  # exited meanwhile
            children.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo += children.get(p, [])
    return tree


def _kill_tree(pid: int) -> None:
    for p in process_tree(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)


def kill_when(
    launcher: list[str],
    *train_args: str,
    ready: Callable[[], bool],
    delay: float = 0.0,
    timeout: float = 150,
    sig: signal.Signals | None = None,
) -> subprocess.CompletedProcess:
    """Start train.py, SIGKILL the launcher and every rank `delay` seconds after `ready()` turns true;
    or, with `sig`, send that signal to the launcher alone and wait for the run to end."""
    proc = subprocess.Popen(
        _command(launcher, train_args),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None or time.monotonic() > deadline:
            _kill_tree(proc.pid)
            out, _ = proc.communicate()
            raise AssertionError(
                f"the run {'ended' if proc.returncode is not None else 'hung'} before it was ready:\n{out}"
            )
        time.sleep(0.02)
    time.sleep(delay)
    if sig is None:
        _kill_tree(proc.pid)
    else:
        proc.send_signal(sig)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_tree(proc.pid)
        out, _ = proc.communicate()
        raise AssertionError(f"the run did not end within {timeout}s of {sig!r}:\n{out}") from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, "")
