"""Checkpoints written in the background (checkpoint_async=true) under `accelerate launch`: training
goes on while a write is in flight, a kill meanwhile leaves the previous checkpoint the newest
complete one, a stop signal waits for the write before it writes its own, and the run that resumes
ends bit-identical to one never interrupted. `debug.slow_write_at` holds one write in flight (a slow
disk) through the real writer. The in-job restart tests (test_resume.py) resume from background
checkpoints on DDP and FSDP2 as well; DeepSpeed's refusal is in test_failures.py."""

from __future__ import annotations

import json
import signal

import pytest
import torch

from tests.launcher import accelerate, kill_when, launch
from tests.test_resume import weights

pytestmark = pytest.mark.slow

ARGS = ["steps=12", "checkpoint_every=2", "log_every=1", "checkpoint_async=true", "run_name=run"]


def trained_to(run_dir, step: int):
    """Whether the run reported `step` optimizer steps done (status.json, written at each log)."""

    def ready() -> bool:
        try:
            return json.loads((run_dir / "status.json").read_text())["step"] >= step
        except (OSError, ValueError, KeyError):
            return False

    return ready


def published(run_dir) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("step-"))


def test_a_kill_or_a_stop_during_a_background_write_loses_nothing(tmp_path):
    launch(accelerate(), *ARGS, f"output_dir={tmp_path / 'straight'}", "checkpoint_async=false", "checkpoint_every=0")
    run = tmp_path / "bg" / "run"
    args = [*ARGS, f"output_dir={tmp_path / 'bg'}"]

    # The write of step 4 hangs; steps 5 and 6 train meanwhile; the job is killed at step 6.
    slow = ["debug.slow_write_at=4", "debug.slow_write_s=300"]
    kill_when(accelerate(), *args, *slow, ready=trained_to(run, 6), timeout=120)
    assert published(run) == ["step-00000002", "step-00000004.tmp"], "step 4 was in flight, step 2 complete"

    # Resumed from step 2; a stop signal at step 7 or later, while the write of step 6 takes 3 s.
    slow = ["debug.slow_write_at=6", "debug.slow_write_s=3"]
    stopped = kill_when(accelerate(), *args, *slow, ready=trained_to(run, 7), sig=signal.SIGTERM, timeout=120)
    assert "resuming from" in stopped.stdout and "step-00000002" in stopped.stdout, stopped.stdout[-3000:]
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "stopped" and status["step"] in (7, 8), status
    assert published(run)[-2:] == ["step-00000006", f"step-{status['step']:08d}"], "the write in flight, then its own"

    # From the checkpoint written while steps 7 and 8 trained: it holds the state of step 6.
    launch(accelerate(), *args, f"resume={run / 'checkpoints' / 'step-00000006'}")
    straight, resumed = weights(tmp_path / "straight" / "run"), weights(run)
    assert straight.keys() == resumed.keys() and straight
    for file, tensors in straight.items():
        for name, value in tensors.items():
            assert torch.equal(value, resumed[file][name]), f"{file}:{name} differs"
