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
import re
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.cases import RECIPES, TINY_GAN
from tests.dist import free_port
from tests.launcher import Job, accelerate, kill_when, launch
from tests.tracking_files import wandb_runs

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
    # the main process, which holds the W&B run: the restarted group continues that run
    "gan": ["debug.fail_how=raise", "debug.fail_at_step=5", "debug.fail_rank=0", "tracker=wandb", "wandb.mode=offline"],
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

    straight = weights(tmp_path / "straight")
    assert_same(weights(tmp_path / "killed"), straight, when)

    fault = RESTART_FAULTS[case]
    run_dir = restarted(launcher, [*args, *fault], tmp_path / "restarted")
    assert_same(weights(run_dir), straight, f"after {fault}")
    if "checkpoint_async=true" in fault:  # the weights a background checkpoint holds (FSDP2: gathered by its thread)
        written = [weights(d / "checkpoints" / "step-00000023" / "models") for d in (run_dir, tmp_path / "killed")]
        assert_same(*written, "in the background checkpoint of step 23")
    if "tracker=wandb" in fault:
        failed, continued = wandb_runs(str(run_dir))  # one file per attempt, one W&B run
        assert continued.resumed and failed.run_id == continued.run_id, (failed.run_id, continued.run_id)
        assert continued.steps("restarts") and continued.history["restarts"][continued.steps("restarts")[0]] == 1


def restarted(launcher: str, args: list[str], output_dir) -> Path:
    """The run directory of `args` under `accelerate launch --max_restarts 1` without a run name,
    once its one restart finished it (checked)."""
    restarts = [*accelerate(launcher)[:2], "--max_restarts", "1", *accelerate(launcher)[2:]]
    result = launch(restarts, *args, f"output_dir={output_dir}", timeout=300)
    (run_dir,) = output_dir.iterdir()  # the restarted group found the first one's directory
    assert "restart 1 of 1: resuming from" in result.stdout, result.stdout[-3000:]
    assert "restart 1 of 1: step" in result.stdout and "after the failed attempt's last recorded" in result.stdout
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "finished" and status["restarts"] == 1, status
    return run_dir


def assert_same(found: dict, expected: dict, what: str) -> None:
    assert found.keys() == expected.keys() and expected, (found.keys(), expected.keys())
    for file, tensors in expected.items():
        for name, value in tensors.items():
            assert torch.equal(found[file][name], value), f"{file}:{name} differs {what}"


def test_a_zero2_group_restarts_bit_identically(tmp_path):
    # ZeRO 2 beside ZeRO 3 above: its partitions of the optimizer state, whole weights on each process.
    launcher = "configs/accelerate/deepspeed_zero2.yaml"
    args = [*CASES["seq2seq-zero3"], *SHAPE, "checkpoint_every=2"]
    launch(accelerate(launcher), *args, f"output_dir={tmp_path}", "run_name=straight", "checkpoint_every=0")
    run_dir = restarted(launcher, [*args, "debug.fail_at_step=6"], tmp_path / "restarted")
    assert_same(weights(run_dir), weights(tmp_path / "straight"), "after a process was killed at step 6")


def test_without_restarts_the_same_failure_ends_the_job_naming_the_process(tmp_path):
    args = ["steps=8", "checkpoint_every=2", f"output_dir={tmp_path}", "run_name=run", "debug.fail_at_step=5"]
    result = launch(accelerate(), *args, ok=False)
    assert result.returncode != 0
    assert "process 1: debug.fail_how=kill at step 5 (a rehearsed failure)" in result.stdout, result.stdout[-2000:]
    cause = result.stderr.split("Root Cause (first observed failure)")[-1]  # the launcher's summary
    assert "rank      : 1 (local_rank: 1)" in cause and "SIGKILL" in cause, result.stderr[-2000:]
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert status["state"] == "failed" and "restarts" not in status, status


def test_a_lost_node_restarts_the_group_on_the_processes_left_resharded(tmp_path, monkeypatch):
    # Two "nodes" of one process each under torch's elastic launcher (--nnodes 1:2); one node is lost
    # (its launcher and its process SIGKILLed). The other's group restarts on 1 process, resumes the
    # FSDP2 shards resharded, and ends bit-identical to the run that resumes the same checkpoint on 1
    # process by hand: the straight run's math from the step it resumed.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # one thread per process under every launcher: the same sums
    args = [*RECIPES["seq2seq"], "seq2seq.num_train=40", "fsdp.enabled=true", *SHAPE, f"output_dir={tmp_path}"]
    args += ["steps=10", "checkpoint_every=2", "keep_checkpoints=10"]
    straight_ckpts = tmp_path / "straight" / "checkpoints"
    launch(accelerate(), *args, "run_name=straight", "checkpoint_every=1")

    port = free_port()
    node = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1:2", "--nproc_per_node", "1"]
    node += ["--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "lost-node"]
    node += ["--max_restarts", "1", "--monitor_interval", "0.5", "--rdzv_conf"]
    # The node that stays serves the rendezvous store. Both join the first round (within its last
    # call); after the loss, the next round waits as long for a node that does not come.
    conf = "join_timeout=120,last_call_timeout=5,is_host="
    run = tmp_path / "elastic"
    with Job([*node, conf + "true"], *args, "run_name=elastic") as first:
        lost = Job([*node, conf + "false"], *args, "run_name=elastic")
        deadline = time.monotonic() + 120
        while not (run / "checkpoints" / "step-00000004").exists():
            assert time.monotonic() < deadline and first.proc.poll() is None, first.end()[-3000:]
            time.sleep(0.05)
        lost.end()  # the node is gone: its launcher and its process
        result = first.wait(240)
    lost.end()
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-3000:]
    resumed = re.search(r"restart 1 of 1: resuming from \S+/step-(\d{8}) ", out)
    said = "was written by 2 processes, this run has 1: its FSDP2 shards are resharded to them; the updates continue"
    assert resumed and said in out, out[-3000:]  # no dropout in this model: nothing is reseeded
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "finished" and status["restarts"] == 1, status

    checkpoint = straight_ckpts / f"step-{resumed.group(1)}"
    launch([*accelerate(), "--num_processes", "1"], *args, "run_name=by-hand", f"resume={checkpoint}")
    assert_same(weights(run), weights(tmp_path / "by-hand"), "from resuming the same checkpoint by hand")
