"""A run killed at a random moment and resumed ends bit-identical to one that never stopped.

Each case trains 2 processes under `accelerate launch`: once straight through, once killed with
SIGKILL (the launcher and every rank) at a random moment after its first checkpoint, then started
again with the same command, which resumes on its own (resume=auto).
"""

from __future__ import annotations

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
