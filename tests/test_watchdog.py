"""The watchdog's parts on their own, in real processes: a stalled process ends with status 4 and a
report; a stop signal reaches the watchdog while the main thread is stuck where no Python signal
handler can run; the job's board never holds its caller up when the store's host is stopped; and
multiprocessing's sockets fit whatever TMPDIR is. The whole-job cases are in test_stalls.py."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.launcher import REPO

# A process with a watchdog whose loop stopped in `PHASE`: its main thread then waits with every
# signal blocked, as a thread inside a collective waits (a signal's Python handler never runs there).
STUCK = """
import os, signal, sys, time
from disttrain.preemption import stop_signals_caught
from disttrain.resilience.progress import Progress
from disttrain.resilience.watchdog import Limits, Watchdog

run_dir, phase, stall, data, grace = sys.argv[1], sys.argv[2], *map(float, sys.argv[3:6])
responsive = sys.argv[6:] == ["responsive"]
progress = Progress()
progress.window(4, 0, 3)
progress.at(phase, 1)
watchdog = Watchdog(Limits(stall, data, grace), progress, 0, 1, 10, run_dir, "k")
with watchdog.running(), stop_signals_caught(lambda name: None, watchdog.signal_fd, watchdog.main_thread_stops):
    if not responsive:
        signal.pthread_sigmask(signal.SIG_BLOCK, set(signal.Signals))
    print("stuck", flush=True)
    if sys.argv[6:] == ["gil"]:  # C code that holds the GIL: no Python thread runs again
        import ctypes
        ctypes.PyDLL(None).sleep(600)
    try:
        time.sleep(600)
    except KeyboardInterrupt:  # the second signal, handled here: a teardown that takes its time
        time.sleep(4)
        sys.exit(7)
"""


def stuck(tmp_path, phase: str, stall: float = 0, data: float = 0, grace: float = 0, how: str = "") -> subprocess.Popen:
    script = tmp_path / "stuck.py"  # a file: the report's stacks show its lines
    script.write_text(STUCK)
    proc = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path), phase, str(stall), str(data), str(grace)] + ([how] if how else []),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline() == "stuck\n", proc.communicate()
    return proc


def ended(proc: subprocess.Popen, timeout: float = 60) -> tuple[int, str]:
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"still running after {timeout}s: {proc.communicate()}") from None
    return proc.returncode, err


def test_no_progress_ends_the_process_with_a_report(tmp_path):
    code, err = ended(stuck(tmp_path, "backward", stall=1.0, data=30))
    assert code == 4, err
    assert err.startswith("stalled: process 0 made no progress for 1s in backward at step 5 of 10, ")
    assert "micro-batch 2 of 3, above stall_timeout_s=1" in err
    report = (tmp_path / "stalls" / "rank0.txt").read_text()
    assert "what: process 0 made no progress for 1s in backward at step 5 of 10" in report
    assert "time.sleep(600)" in report, "the main thread's stack, where it is stuck"
    status = json.loads((tmp_path / "status.json").read_text())
    assert status["state"] == "stalled" and status["phase"] == "backward" and status["step"] == 4
    assert status["report"] == str(tmp_path / "stalls" / "rank0.txt")


def test_the_data_phase_has_its_own_limit(tmp_path):
    code, err = ended(stuck(tmp_path, "data", stall=30, data=1.0))
    assert code == 4 and "in data at step 5 of 10, micro-batch 2 of 3, above data_timeout_s=1" in err, err


def test_a_stop_signal_reaches_the_watchdog_while_the_main_thread_is_stuck(tmp_path):
    proc = stuck(tmp_path, "item counts", stall=600, grace=1.0)
    proc.send_signal(signal.SIGTERM)
    code, err = ended(proc)
    assert code == 4, err
    assert "process 0 got SIGTERM 1s ago and made no progress since, in item counts at step 5 of 10" in err
    assert "above stop_grace_s=1): stopped without a checkpoint" in err
    assert "stopped without a checkpoint" in (tmp_path / "stalls" / "rank0.txt").read_text()


@pytest.mark.slow
def test_a_second_signal_stops_at_once(tmp_path):
    proc = stuck(tmp_path, "backward", stall=600, data=1, grace=600)  # data=1: beats every 0.2 s
    proc.send_signal(signal.SIGTERM)
    time.sleep(1.5)  # later than a duplicate of the first one
    proc.send_signal(signal.SIGINT)
    code, err = ended(proc)
    assert code == 1, err
    assert "process 0 stopped at once in backward at step 5 of 10, micro-batch 2 of 3 on SIGINT after SIGTERM" in err
    assert json.loads((tmp_path / "status.json").read_text())["state"] == "failed"


@pytest.mark.slow
def test_a_second_signal_the_main_thread_handles_is_left_to_it(tmp_path):
    proc = stuck(tmp_path, "backward", stall=600, data=1, how="responsive")  # data=1: beats every 0.2 s
    proc.send_signal(signal.SIGTERM)
    time.sleep(1.5)
    proc.send_signal(signal.SIGINT)
    code, err = ended(proc)
    assert code == 7, f"the watchdog ended a process that was stopping by itself: {err}"


@pytest.mark.slow
def test_a_process_whose_gil_is_held_ends_by_faulthandler(tmp_path):
    """The watchdog's thread cannot run: faulthandler's timer (no GIL needed) prints the stacks and ends it."""
    code, err = ended(stuck(tmp_path, "forward", data=1, how="gil"))  # backstop: 1 + 5 x 0.2 + 10 s
    assert code == 1 and "Timeout (0:00:12)!" in err, err
    assert "ctypes.PyDLL(None).sleep(600)" in err or "stuck.py" in err, err


def test_no_limit_no_end(tmp_path):
    proc = stuck(tmp_path, "data", stall=0, data=0, grace=0)
    time.sleep(2)
    assert proc.poll() is None
    proc.kill()
    proc.communicate()


# --------------------------------------------------------------------------- the job's board


def _serve_store(port: int, ready) -> None:
    import torch.distributed as dist

    store = dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False)
    ready.set()
    time.sleep(120)
    del store


def _state(pid: int) -> str:
    """The state letters of the process's threads in /proc, as one string ("T": all stopped by a signal)."""
    states = set()
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/stat") as f:
            states.add(f.read().rsplit(")", 1)[1].split()[0])
    return "".join(sorted(states))


@pytest.mark.slow
def test_the_board_posts_one_first_failure_and_never_blocks_on_a_stopped_store(monkeypatch):
    from disttrain.resilience.board import Board
    from tests.dist import free_port

    port = free_port()
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Event()
    server = ctx.Process(target=_serve_store, args=(port, ready), daemon=True)
    server.start()
    try:
        assert ready.wait(60)
        monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
        monkeypatch.setenv("MASTER_PORT", str(port))
        boards = [Board.for_job("t", r, 2, 0.2, lambda r=r: {"rank": r, "time": time.time()}) for r in range(2)]
        for board in boards:
            board.start()
        assert boards[1].post({"rank": 1, "what": "first"}, wait_s=30) == {"rank": 1, "what": "first"}
        assert boards[0].post({"rank": 0, "what": "second"}, wait_s=30) == {"rank": 1, "what": "first"}
        deadline = time.monotonic() + 30
        while boards[0].notice is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert boards[0].notice == {"rank": 1, "what": "first"}, "seen by the beat, without asking"
        beats = boards[0].heartbeats(wait_s=30)
        assert sorted(beats) == [0, 1] and beats[1]["rank"] == 1

        os.kill(server.pid, signal.SIGSTOP)  # a store call now blocks without end
        stopped_at = time.monotonic() + 30
        while _state(server.pid) != "T":  # every thread stopped: the signal takes a moment under load
            assert time.monotonic() < stopped_at, f"process {server.pid} not stopped: {_state(server.pid)}"
            time.sleep(0.01)
        started = time.monotonic()
        assert boards[0].heartbeats(wait_s=0.5) is None
        assert time.monotonic() - started < 5, "the caller waits only as long as it chose"
        os.kill(server.pid, signal.SIGCONT)
        for board in boards:
            board.stop()
    finally:
        server.kill()
        server.join()


# --------------------------------------------------------------------------- sockets under a long TMPDIR

LISTEN = """
import multiprocessing.connection, sys, tempfile
from disttrain.unix_sockets import short_socket_dir
if sys.argv[1] == "fix":
    print(short_socket_dir() is not None, flush=True)
with multiprocessing.connection.Listener(family="AF_UNIX") as listener:
    print(len(listener.address), listener.address.startswith(tempfile.gettempdir()))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the socket path limit checked is Linux's")
def test_sockets_fit_under_a_temporary_directory_too_long_for_them(tmp_path):
    long = tmp_path / ("d" * (110 - len(str(tmp_path))))
    long.mkdir()
    env = {**os.environ, "TMPDIR": str(long)}
    plain = subprocess.run([sys.executable, "-c", LISTEN, "plain"], env=env, capture_output=True, text=True, cwd=REPO)
    assert plain.returncode != 0 and "AF_UNIX path too long" in plain.stderr, "the failure this guards against"
    fixed = subprocess.run([sys.executable, "-c", LISTEN, "fix"], env=env, capture_output=True, text=True, cwd=REPO)
    moved, length_and_under = fixed.stdout.splitlines()
    assert fixed.returncode == 0 and moved == "True", fixed.stderr
    assert int(length_and_under.split()[0]) < 108 and length_and_under.endswith("False")
    short = subprocess.run(
        [sys.executable, "-c", LISTEN, "fix"], capture_output=True, text=True, cwd=REPO, env={**env, "TMPDIR": "/tmp"}
    )
    assert short.stdout.splitlines()[0] == "False", "a TMPDIR that fits is kept"
