"""The suite itself: stopped from outside, it still tears down what it started; ports never collide."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import uuid

import pytest

from tests.dist import free_port
from tests.launcher import LINGER_S, REPO, end_marked, marked


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


# A suite that has everything running at once: a SLURM cluster with a job training, a Docker daemon
# (where dockerd is installed), processes of the package's own launcher, and `accelerate launch` with
# DataLoader workers; then it waits. Each part announces itself with a file in INNER_DIR.
EVERYTHING = """
import contextlib, os, pathlib, shutil, threading
import pytest
from tests.dist import run_distributed
from tests.dockerd import docker_daemon
from tests.launcher import accelerate, launch
from tests.workers import wait_forever

OUT = pathlib.Path(os.environ["INNER_DIR"])
TRAIN = ("config=configs/debug.yaml", "steps=1000000", "progress_bar=false", "tracker=none", "log_every=1000")


def test_everything_at_once(request):
    try:
        cluster = request.getfixturevalue("slurm_cluster")
    except pytest.skip.Exception:
        cluster = None
    if cluster is not None:
        cluster.submit(
            "slurm/single_node.sbatch", f"--output={OUT / 'slurm.out'}", "--gpus-per-node=1", "--cpus-per-task=1",
            train_args=(*TRAIN, f"output_dir={OUT / 'slurm'}", "run_name=job", "data.num_workers=1"),
        )
    (OUT / "spawned").mkdir()
    threading.Thread(target=run_distributed, args=(wait_forever, 2, str(OUT / "spawned")), daemon=True).start()
    with contextlib.ExitStack() as stack:
        if shutil.which("dockerd"):
            stack.enter_context(docker_daemon(OUT / "docker" / "data"))
            (OUT / "dockerd").touch()
        launch(accelerate(), *TRAIN, f"output_dir={OUT / 'launched'}", "run_name=run", "data.num_workers=2", timeout=600)
"""


@pytest.mark.slow
def test_a_suite_stopped_by_sigterm_leaves_no_process_behind(tmp_path):
    """Every process the suite starts inherits its environment, mark included: none may outlive it."""
    mark = uuid.uuid4().hex
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    (tmp_path / "test_everything.py").write_text(EVERYTHING)
    inner = subprocess.Popen(
        [
            *(sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-c", str(tmp_path / "pytest.ini")),
            *("-p", "tests.stop_on_signals", "-p", "tests.slurm_cluster", str(tmp_path / "test_everything.py")),
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "INNER_DIR": str(tmp_path), "DISTTRAIN_SUITE": mark},
    )
    slurm = os.geteuid() == 0 and shutil.which("slurmctld") is not None  # else the cluster is skipped
    started = {
        "accelerate launch with DataLoader workers": (tmp_path / "launched" / "run" / "config.yaml").exists,
        "the package's launcher": lambda: len(list((tmp_path / "spawned").glob("*"))) == 2,
        **({"a SLURM job": (tmp_path / "slurm" / "job" / "config.yaml").exists} if slurm else {}),
    }
    try:
        deadline = time.monotonic() + 240
        while not all(ready() for ready in started.values()):
            assert inner.poll() is None and time.monotonic() < deadline, inner.communicate()[0][-3000:]
            time.sleep(0.1)
        time.sleep(1.0)  # the DataLoader workers are up once the runs train
        running = marked(mark, "DISTTRAIN_SUITE")
        inner.send_signal(signal.SIGTERM)
        out, _ = inner.communicate(timeout=120)
        # What was killed a moment ago may still be in the table, and a process that ends with its
        # parent (the forkserver) may take a moment under load to notice.
        deadline = time.monotonic() + LINGER_S
        while marked(mark, "DISTTRAIN_SUITE") and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        if inner.poll() is None:
            inner.kill()
        left = end_marked(mark, "DISTTRAIN_SUITE")
    parts = [*started, *(["dockerd"] if (tmp_path / "dockerd").exists() else [])]
    assert not left, f"left behind by a suite stopped with {parts} running: {left}\n{out[-3000:]}"
    assert len(running) >= 7, f"2 ranks + 2 workers + their launcher, 2 spawned ranks and their server: {running}"
    assert "stopped by SIGTERM" in out, out[-3000:]
