"""No run hangs: a job of 2 processes under `accelerate launch` with a fault on rank 1 (the fixture
recipe tests/fixture_recipes/stalling.py) ends every process within the limit that applies, plus a
few seconds, with status.json and a report naming the stuck process and place; and leaves no
process behind (tests/launcher.py looks for the job's processes in the process table).

The few seconds: the watchdog looks every tenth of its shortest limit, a report and the launcher's
teardown follow; BOUND_S is generous so that a loaded machine does not fail a correct run."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from tests.launcher import Job, accelerate, launch

pytestmark = pytest.mark.slow

STALLING = ["recipe=tests.fixture_recipes.stalling", "tracker=none", "progress_bar=false", "log_every=1000"]
BOUND_S = 25.0  # after the limit: detection, reports, the launcher's teardown


def start(tmp_path, *args: str) -> Job:
    return Job(accelerate(), *STALLING, f"output_dir={tmp_path}", "run_name=run", *args)


def struck(job: Job, marker, timeout: float = 120) -> int:
    """Wait for the fault to strike; the pid of the process it struck."""
    deadline = time.monotonic() + timeout
    while not marker.exists() or not marker.read_text():
        if job.proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"the fault never struck:\n{job.end()}")
        time.sleep(0.02)
    return int(marker.read_text())


def status(tmp_path) -> dict:
    return json.loads((tmp_path / "run" / "status.json").read_text())


def report(tmp_path, rank: int) -> str:
    return (tmp_path / "run" / "stalls" / f"rank{rank}.txt").read_text()


def test_a_stopped_process_is_named_and_the_job_ends(tmp_path):
    # The collective would wait 300 s: the watchdog (4 s) ends the job first and says why.
    args = ["stalling.fault=none", f"stalling.marker={tmp_path / 'struck'}", "stall_timeout_s=4"]
    with start(tmp_path, *args, "collective_timeout_s=300") as job:
        os.kill(struck(job, tmp_path / "struck"), signal.SIGSTOP)
        took = job.wait_gone(4 + BOUND_S)
        out = job.end()
    assert status(tmp_path)["state"] == "stalled" and status(tmp_path)["rank"] == 1, (took, out[-3000:])
    line = next(line for line in out.splitlines() if line.startswith("stalled: "))
    assert "process 0 made no progress for" in line and "above stall_timeout_s=4; held up by rank 1 (not heard" in line
    assert f"report {tmp_path / 'run' / 'stalls' / 'rank0.txt'}" in line and line.endswith("exit status 4")
    assert "process 0: killed rank 1 (pid" in out, "a stopped process cannot end by itself"
    assert "held up by rank(s) 1: not heard from" in report(tmp_path, 0)


def test_a_process_stuck_in_its_forward_is_named_with_its_stack(tmp_path):
    with start(
        tmp_path, "stalling.fault=forward", f"stalling.marker={tmp_path / 'struck'}", "stall_timeout_s=4"
    ) as job:
        struck(job, tmp_path / "struck")
        job.wait_gone(4 + BOUND_S)
        out = job.end()
    assert status(tmp_path)["state"] == "stalled", out[-3000:]
    assert (status(tmp_path)["rank"], status(tmp_path)["phase"]) == (1, "forward"), status(tmp_path)
    assert "time.sleep(3600)" in report(tmp_path, 1), "the stuck process's own stack"
    assert "held up by rank(s) 1: behind the others" in report(tmp_path, 0)


def test_a_hung_dataloader_worker_is_reported_with_its_stack(tmp_path):
    args = ["stalling.fault=getitem", f"stalling.marker={tmp_path / 'struck'}", "data.num_workers=1"]
    with start(tmp_path, *args, "data_timeout_s=3", "stall_timeout_s=300") as job:
        worker = struck(job, tmp_path / "struck")
        job.wait_gone(3 + BOUND_S)
        out = job.end()
    assert (status(tmp_path)["state"], status(tmp_path)["rank"], status(tmp_path)["phase"]) == ("stalled", 1, "data"), (
        out
    )
    assert "above data_timeout_s=3" in status(tmp_path)["detail"]
    stuck = report(tmp_path, 1)
    assert f"worker 0 (pid {worker}): alive" in stuck
    assert "threading.Event().wait()" not in stuck  # faulthandler's stacks name functions, not lines:
    assert "in __getitem__" in stuck and "stalling.py" in stuck, stuck


def test_a_stop_signal_while_a_process_waits_for_data_ends_within_the_grace(tmp_path):
    # The case seen in the suite: the launcher killed while a rank waited for a batch that never came.
    # Its ranks hear of it (SIGTERM), cannot reach the step's end, and stop after stop_grace_s.
    args = ["stalling.fault=getitem", f"stalling.marker={tmp_path / 'struck'}", "data.num_workers=1"]
    with start(tmp_path, *args, "stop_grace_s=3") as job:
        struck(job, tmp_path / "struck")
        job.proc.kill()  # the launcher alone
        try:
            job.wait_gone(3 + BOUND_S)
        except AssertionError as e:  # what each process said of itself, beside what is left of it
            said = {
                p.name: p.read_text()[:1500] for p in (tmp_path / "run").glob("**/*") if p.suffix in (".txt", ".json")
            }
            raise AssertionError(f"{e}\n{said}\n{job.end()[-3000:]}") from None
        out = job.end()
    assert status(tmp_path)["state"] == "stalled", out[-3000:]
    for rank in (0, 1):
        assert "got SIGTERM" in report(tmp_path, rank) and "stopped without a checkpoint" in report(tmp_path, rank)
    # The store died with the launcher: each failed store call prints a C++ trace of 2 KB, so each
    # process calls it no more once the connection broke (one per heartbeat filled 64 KiB pipes).
    assert out.count("TCPStore.cpp") <= 2, out[-3000:]
    assert "the job's store ended: Broken pipe" in report(tmp_path, 0)
    assert not (tmp_path / "run" / "checkpoints").exists() or not os.listdir(tmp_path / "run" / "checkpoints")


def test_a_batch_a_worker_cannot_hand_over_fails_at_once_naming_why(tmp_path):
    # Python's queue would print the error and drop the batch, and its process wait for it forever.
    args = ["stalling.fault=unpicklable", "data.num_workers=1", "data_timeout_s=600"]
    result = launch(accelerate(), *STALLING, f"output_dir={tmp_path}", "run_name=run", *args, ok=False, timeout=120)
    assert result.returncode != 0
    assert status(tmp_path)["state"] == "failed" and status(tmp_path)["rank"] == 1
    assert (
        "worker 0 (pid" in status(tmp_path)["detail"]
        and "ended with exit status 70: could not hand a micro-batch over to its process: TypeError: cannot pickle"
        in status(tmp_path)["detail"]
    )
    assert "process 0 ends because process 1 failed in data at step" in report(tmp_path, 0)
