"""The one way tests run train.py as a user would: under a real launcher, in fresh processes.

Every process a job starts (the launcher, its ranks, their DataLoader workers) carries a mark in its
environment (`MARK`), so that all of them can be found in the process table and ended, even those
that left the launcher's tree (torch's agent starts each rank in a session of its own; an orphan is
adopted by init). A job that ends leaves none behind, or its test fails naming them; a job whose test
is interrupted (a timeout, Ctrl-C, the suite's SIGTERM) has all of them killed.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable

from tests.dist import free_port

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ACCELERATE = os.path.join(os.path.dirname(sys.executable), "accelerate")
PYTHON = [sys.executable]
MARK = "DISTTRAIN_TEST_JOB"
LINGER_S = 10.0  # how long a job's processes may take to go once its launcher ended


def accelerate(config: str = "configs/accelerate/ddp.yaml") -> list[str]:
    """`accelerate launch` with an Accelerate config file (2 CPU processes for ddp.yaml), on a free port."""
    return [ACCELERATE, "launch", "--config_file", config, "--main_process_port", str(free_port())]


def _command(launcher: list[str], train_args: tuple[str, ...]) -> list[str]:
    chosen = any(a.startswith(("config=", "recipe=")) for a in train_args)
    config = [] if chosen else ["config=configs/debug.yaml"]
    return [*launcher, "train.py", *config, *train_args]


def describe_process(pid: int) -> str:
    """What a process left behind is doing, for a failure message: its parent (a rank's is the
    launcher, a DataLoader worker's its rank), state, threads and where the kernel holds it."""
    try:
        with open(f"/proc/{pid}/status") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        with open(f"/proc/{pid}/wchan") as f:
            wchan = f.read().strip()
    except OSError as e:
        return f"pid {pid}: {e}"
    get = lambda key: fields.get(key, "?").strip()  # noqa: E731
    return f"pid {pid}: parent {get('PPid')}, state {get('State')}, {get('Threads')} thread(s), in {wchan or '?'}"


def marked(mark: str, name: str = MARK) -> list[tuple[int, str]]:
    """(pid, command line) of every live process whose environment holds `name`=`mark`."""
    needle = f"{name}={mark}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if needle not in f.read().split(b"\0"):
                    continue
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                command = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:  # gone meanwhile, a zombie, or another user's
            continue
        found.append((int(entry), command))
    return found


def end_marked(mark: str, name: str = MARK) -> list[tuple[int, str]]:
    """SIGKILL every process marked `mark` (until none is left); returns those found at first."""
    first = marked(mark, name)
    for _ in range(50):
        alive = marked(mark, name)
        if not alive:
            break
        for pid, _command in alive:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)
    return first


class Job:
    """train.py under `launcher`, started now (debug.yaml unless a config or recipe is given)."""

    def __init__(self, launcher: list[str], *train_args: str, merge_output: bool = False):
        self.mark = uuid.uuid4().hex
        self.proc = subprocess.Popen(
            _command(launcher, train_args),
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT if merge_output else subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", MARK: self.mark},
        )
        # Read as it comes: a pipe nobody reads holds 64 KiB, then blocks every process writing to it
        # (a rank printing its last line before it ends would wait there for good).
        self._said: dict[str, list[str]] = {"stdout": [], "stderr": []}
        self._readers = [
            threading.Thread(target=self._read, args=(stream, self._said[name]), daemon=True)
            for name, stream in (("stdout", self.proc.stdout), ("stderr", self.proc.stderr))
            if stream is not None
        ]
        for reader in self._readers:
            reader.start()

    @staticmethod
    def _read(stream, into: list[str]) -> None:
        with contextlib.suppress(ValueError, OSError):
            for line in stream:
                into.append(line)

    def _collected(self, timeout: float) -> tuple[str, str]:
        """Everything the job wrote (stdout, stderr), once its pipes closed or `timeout` passed."""
        deadline = time.monotonic() + timeout
        for reader in self._readers:
            reader.join(max(0.0, deadline - time.monotonic()))
        return "".join(self._said["stdout"]), "".join(self._said["stderr"])

    def __enter__(self) -> Job:
        return self

    def __exit__(self, *exc: object) -> None:
        self.end()

    def processes(self) -> list[tuple[int, str]]:
        return marked(self.mark)

    def end(self) -> str:
        """Kill every process of the job, wherever it is in the process table; its output so far."""
        end_marked(self.mark)
        if self.proc.poll() is None:
            self.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)
        out, err = self._collected(timeout=10)
        return out + err

    def wait_gone(self, timeout: float) -> float:
        """Wait until no process of the job is left (the launcher may have been killed); the seconds it
        took. Past `timeout`, kill what is left and fail, naming it."""
        started = time.monotonic()
        while self.processes():
            if time.monotonic() - started > timeout:
                seen = "; ".join(describe_process(pid) for pid, _ in marked(self.mark))
                left = end_marked(self.mark)
                raise AssertionError(f"{len(left)} process(es) still running after {timeout}s: {left}; {seen}")
            time.sleep(0.05)
        return time.monotonic() - started

    def wait(self, timeout: float) -> subprocess.CompletedProcess:
        """The launcher's result; the job's processes must all be gone soon after it (LINGER_S)."""
        try:
            self.proc.wait(timeout=timeout)
            out, err = self._collected(timeout=LINGER_S)
        except subprocess.TimeoutExpired as e:
            raise AssertionError(f"no result after {timeout}s; output so far:\n{self.end()}") from e
        deadline = time.monotonic() + LINGER_S
        while self.processes() and time.monotonic() < deadline:
            time.sleep(0.1)
        left = end_marked(self.mark)
        assert not left, f"the job left {len(left)} process(es) behind: {left}\n{(out or '')[-2000:]}"
        return subprocess.CompletedProcess(self.proc.args, self.proc.returncode, out, err or "")


def launch(launcher: list[str], *train_args: str, timeout: float = 300, ok: bool = True) -> subprocess.CompletedProcess:
    """Run train.py under `launcher` and wait for it."""
    with Job(launcher, *train_args) as job:
        result = job.wait(timeout)
    if ok:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def kill_when(
    launcher: list[str],
    *train_args: str,
    ready: Callable[[], bool],
    delay: float = 0.0,
    timeout: float = 150,
    sig: signal.Signals | None = None,
) -> subprocess.CompletedProcess:
    """Start train.py, SIGKILL the launcher and every process of the job `delay` seconds after
    `ready()` turns true; or, with `sig`, send that signal to the launcher alone and wait for the run
    to end."""
    with Job(launcher, *train_args, merge_output=True) as job:
        deadline = time.monotonic() + timeout
        while not ready():
            if job.proc.poll() is not None or time.monotonic() > deadline:
                state = "ended" if job.proc.poll() is not None else "hung"
                raise AssertionError(f"the run {state} before it was ready:\n{job.end()}")
            time.sleep(0.02)
        time.sleep(delay)
        if sig is None:
            out = job.end()
            return subprocess.CompletedProcess(job.proc.args, job.proc.returncode, out, "")
        job.proc.send_signal(sig)
        try:
            return job.wait(timeout)
        except AssertionError as e:
            raise AssertionError(f"the run did not end within {timeout}s of {sig!r}: {e}") from None
