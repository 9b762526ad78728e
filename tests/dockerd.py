"""A Docker daemon for the tests: the one that answers already, or one started here, as root, from
Debian's docker.io (installed if missing), with its own data and exec roots so that it touches no
other daemon's images, no firewall rule and no bridge.

`docker_daemon(data_root)` yields a `Daemon`: the environment a `docker` client needs to reach it,
and whether it was started here. Where no daemon can run (not root, no package, no kernel support)
it skips the test with the reason.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass
class Daemon:
    env: dict[str, str]
    started_here: bool  # then its images are the tests' own, to prune as they see fit


def _answers(env: dict[str, str]) -> bool:
    try:
        return subprocess.run(["docker", "version"], env=env, capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def apt_install(*packages: str) -> None:
    """Install Debian packages for a test, or skip it saying why they cannot be had here."""
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip(f"{', '.join(packages)} missing, and installing them needs root and apt-get")
    # Another apt run (a developer's, a test's) may hold the lock: wait for it instead of failing.
    command = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "-o", "DPkg::Lock::Timeout=300"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    result = subprocess.run([*command, *packages], env=env, capture_output=True, text=True)
    if result.returncode != 0:  # a fresh machine has no package lists yet
        subprocess.run(["apt-get", "update", "-q", "-o", "DPkg::Lock::Timeout=300"], env=env, capture_output=True)
        result = subprocess.run([*command, *packages], env=env, capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"apt-get could not install {', '.join(packages)}: {result.stderr.strip()[-500:]}")


def _stop(process: subprocess.Popen) -> None:
    # SIGTERM lets dockerd stop its containerd and unmount its layers; SIGKILL only if it hangs.
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _unmount_under(path: Path) -> None:
    """dockerd leaves its network namespace mounted in the exec root; without this it cannot be removed."""
    with open("/proc/self/mounts") as mounts:
        points = [line.split()[1] for line in mounts]
    for point in sorted((p for p in points if p.startswith(f"{path}/")), reverse=True):
        subprocess.run(["umount", point], capture_output=True)


def _end_leftover(pidfile: Path, data_root: Path) -> None:
    """A dockerd of an interrupted earlier run on the same data root would hold its lock: end it."""
    try:
        pid = int(pidfile.read_text())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):
        return
    if cmdline and cmdline[0].endswith(b"dockerd") and str(data_root).encode() in cmdline:
        os.kill(pid, signal.SIGTERM)
        for _ in range(120):
            if not Path(f"/proc/{pid}").exists():
                return
            time.sleep(0.5)


@contextlib.contextmanager
def docker_daemon(data_root: Path) -> Iterator[Daemon]:
    """A working daemon for as long as the block runs.

    A daemon started here keeps its images and build cache in `data_root`, so that a later run
    rebuilds only what changed; it is stopped at the end of the block.
    """
    if not shutil.which("docker"):
        apt_install("docker.io")
    if _answers(dict(os.environ)):
        yield Daemon(dict(os.environ), started_here=False)
        return
    if os.geteuid() != 0:
        pytest.skip("no Docker daemon answers, and starting one needs root")
    if not shutil.which("dockerd"):
        apt_install("docker.io")

    data_root.mkdir(parents=True, exist_ok=True)
    # One daemon per data root: a second test run in the same checkout waits for the first.
    lock = open(data_root.parent / "lock", "w")  # noqa: SIM115 (held until the block ends)
    fcntl.flock(lock, fcntl.LOCK_EX)
    pidfile = data_root.parent / "dockerd.pid"
    _end_leftover(pidfile, data_root)
    # containerd's socket lives under the exec root, and a Unix socket path has at most 107 bytes.
    exec_root = Path(tempfile.mkdtemp(prefix="dtdk-", dir="/tmp"))
    socket = exec_root / "docker.sock"
    log_path = data_root.parent / "dockerd.log"
    env = {**os.environ, "DOCKER_HOST": f"unix://{socket}"}
    # No bridge and no iptables: builds and containers use the host's network (--network host) or
    # none, and the host's firewall stays as it is.
    command = [
        shutil.which("dockerd") or "dockerd",
        f"--data-root={data_root}",
        f"--exec-root={exec_root}",
        f"--pidfile={pidfile}",
        f"--host=unix://{socket}",
        "--bridge=none",
        "--iptables=false",
    ]
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        for _ in range(120):
            if process.poll() is not None or _answers(env):
                break
            time.sleep(0.5)
        if not _answers(env):
            tail = log_path.read_text()[-1500:]
            pytest.skip(f"dockerd did not start here (kernel or sandbox support); its log ends:\n{tail}")
        yield Daemon(env, started_here=True)
    finally:
        if process.poll() is None:
            _stop(process)
        _unmount_under(exec_root)
        shutil.rmtree(exec_root, ignore_errors=True)
        lock.close()
