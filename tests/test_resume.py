"""A run killed at a random moment and resumed ends bit-identical to one that never stopped.

Each case trains 2 processes under `accelerate launch`: once straight through, once killed with
SIGKILL (the launcher and every rank) at a random moment after its first checkpoint, then started
again with the same command, which resumes on its own (resume=auto). And once with
`--max_restarts 1` and no run_name, where one process fails (debug.fail_how: killed, an exception,
or a hang the watchdog ends) and the launcher restarts the group, which finds its run directory
and resumes from its newest checkpoint: the job ends with status 0.
"""

from __future__ import annotations

import json
import os
import random

import pytest
import torch
from safetensors.torch import load_file

from tests.cases import RECIPES, TINY_GAN
from tests.launcher import accelerate, kill_when, launch

pytestmark = pytest.mark.slow

SHAPE = ["steps=24", "global_batch_size=16", "micro_batch_size=4", "log_every=3", "progress_bar=false"]
CASES = {
    # dropout on: resuming must restore every process's random generator, not only the weights;
    # DataLoader workers loading ahead: the resumed walk must start at the resumed step
    "seq2seq": [
        *RECIPES["seq2seq_aux"],
        "seq2seq.dropout=0.2",
        "seq2seq.num_train=40",
        "seq2seq.num_eval=8",
        "data.num_workers=2",
    ],
    "gan": ["recipe=gan", *TINY_GAN, "gan.num_train=40", "gan.d_steps=2", "gan.r1_every=2", "data.num_workers=1"],
    # DeepSpeed clips one norm per engine; its checkpoint holds ZeRO 3's partitions of each process
    "seq2seq-zero3": [*RECIPES["seq2seq"], "seq2seq.num_train=40", "seq2seq.decoder.clip_grad_norm=0.05"],
    # FSDP2: every process writes its shards of the models and optimizers (torch.distributed.checkpoint),
    # so the kill can land between two processes' writes; dropout on, and each norm clipped over shards
    "seq2seq-fsdp2": [
        *RECIPES["seq2seq"],
        "seq2seq.dropout=0.2",
        "seq2seq.num_train=40",
        "seq2seq.decoder.clip_grad_norm=0.05",
    ],
}
# How a process fails in the in-job restart of each case, and at which step (after checkpoints).
# DDP and FSDP2 write those checkpoints in the background: the restart resumes from one of them.
RESTART_FAULTS = {
    "seq2seq": ["debug.fail_how=kill", "debug.fail_at_step=7", "checkpoint_async=true"],
    "gan": ["debug.fail_how=raise", "debug.fail_at_step=5", "debug.fail_rank=0"],
    "seq2seq-zero3": ["debug.fail_how=kill", "debug.fail_at_step=6"],
    "seq2seq-fsdp2": ["debug.fail_how=hang", "debug.fail_at_step=6", "stall_timeout_s=10", "checkpoint_async=true"],
}
LAUNCHERS = {
    "seq2seq-zero3": "configs/accelerate/deepspeed_zero3.yaml",
    "seq2seq-fsdp2": "configs/accelerate/fsdp2.yaml",
}


def weights(run_dir) -> dict[str, dict[str, torch.Tensor]]:
    return {f: load_file(os.path.join(run_dir, f)) for f in sorted(os.listdir(run_dir)) if f.endswith(".safetensors")}


@pytest.mark.parametrize("case", list(CASES))
def test_killed_run_resumes_bit_identically(tmp_path, case):
    args = [*CASES[case], *SHAPE, f"output_dir={tmp_path}", "checkpoint_every=1", "keep_checkpoints=2"]
    launcher = LAUNCHERS.get(case, "configs/accelerate/ddp.yaml")
    launch(accelerate(launcher), *args, "run_name=straight", "checkpoint_every=0", timeout=300)

    # Killed a random moment after a random early step: in a step, in a checkpoint write, or between.
    after, delay = random.randint(1, 6), random.uniform(0, 0.1)
    checkpoint = tmp_path / "killed" / "checkpoints" / f"step-{after:08d}"
    killed = kill_when(
        accelerate(launcher), *args, "run_name=killed", ready=checkpoint.exists, delay=delay, timeout=300
    )
    when = f"killed {delay:.2f}s after checkpoint {after}"
    assert killed.returncode == -9 and not list((tmp_path / "killed").glob("*.safetensors")), (
        f"the run finished before it was {when}:\n{killed.stdout[-2000:]}"
    )
    resumed = launch(accelerate(launcher), *args, "run_name=killed", timeout=300)
    assert "resuming from" in resumed.stdout, resumed.stdout[-2000:]

    straight, again = weights(tmp_path / "straight"), weights(tmp_path / "killed")
    assert straight.keys() == again.keys() and straight
    for file, tensors in straight.items():
        for name, value in tensors.items():
            assert torch.equal(value, again[file][name]), f"{file}:{name} differs; {when}"

    restarts = [*accelerate(launcher)[:2], "--max_restarts", "1", *accelerate(launcher)[2:]]
    fault = RESTART_FAULTS[case]
    restarted = launch(restarts, *args, f"output_dir={tmp_path / 'restarted'}", *fault, timeout=300)
    (run_dir,) = (tmp_path / "restarted").iterdir()  # the restarted group found the first one's directory
    assert "restart 1 of 1: resuming from" in restarted.stdout, restarted.stdout[-3000:]
    assert "restart 1 of 1: step" in restarted.stdout and "after the failed attempt's last recorded" in restarted.stdout
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "finished" and status["restarts"] == 1, status
    for file, tensors in weights(run_dir).items():
        for name, value in tensors.items():
            assert torch.equal(value, straight[file][name]), f"{file}:{name} differs after {fault}"


def test_without_restarts_the_same_failure_ends_the_job_naming_the_process(tmp_path):
    args = ["steps=8", "checkpoint_every=2", f"output_dir={tmp_path}", "run_name=run", "debug.fail_at_step=5"]
    result = launch(accelerate(), *args, ok=False)
    assert result.returncode != 0
    assert "process 1: debug.fail_how=kill at step 5 (a rehearsed failure)" in result.stdout, result.stdout[-2000:]
    cause = result.stderr.split("Root Cause (first observed failure)")[-1]  # the launcher's summary
    assert "rank      : 1 (local_rank: 1)" in cause and "SIGKILL" in cause, result.stderr[-2000:]
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert status["state"] == "failed" and "restarts" not in status, status
