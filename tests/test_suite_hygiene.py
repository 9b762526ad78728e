"""The suite itself: stopped from outside, it still tears down what it started; ports never collide."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

from tests.dist import free_port
from tests.launcher import REPO


def test_a_suite_stopped_by_sigterm_runs_its_teardowns(tmp_path):
    started, torn_down = tmp_path / "started", tmp_path / "torn-down"
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    (tmp_path / "test_inner.py").write_text(
        "import pathlib, time\n"
        "import pytest\n\n"
        "@pytest.fixture(scope='session')\n"
        "def daemon():\n"
        f"    pathlib.Path({str(started)!r}).write_text('')\n"
        "    yield\n"
        f"    pathlib.Path({str(torn_down)!r}).write_text('')\n\n"
        "def test_waits(daemon):\n"
        "    time.sleep(120)\n"
    )
    ini, tests = str(tmp_path / "pytest.ini"), str(tmp_path / "test_inner.py")
    inner = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "tests.stop_on_signals",
            "-c",
            ini,
            "-p",
            "no:cacheprovider",
            tests,
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 60
    while not started.exists():
        assert inner.poll() is None and time.monotonic() < deadline, inner.communicate()[0]
        time.sleep(0.05)
    inner.send_signal(signal.SIGTERM)
    out, _ = inner.communicate(timeout=60)
    assert torn_down.exists(), "the session fixture's teardown ran\n" + out
    assert "stopped by SIGTERM" in out


def test_ports_are_handed_out_once_and_below_the_ephemeral_range():
    ports = [free_port() for _ in range(50)]
    assert len(set(ports)) == len(ports)
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        low = int(f.read().split()[0])
    assert all(p < low for p in ports)
