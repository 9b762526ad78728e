"""The GAN end to end through `accelerate launch` with 2 CPU processes, against one process."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file

from tests.launcher import PYTHON, accelerate, launch

pytestmark = pytest.mark.slow

# SGD keeps float32 rounding at rounding size (see test_launch.py); R1 on, lazily, and 2 D steps.
GAN = [
    "config=configs/gan.yaml",
    "steps=8",
    "global_batch_size=32",
    "micro_batch_size=8",
    "log_every=4",
    "gan.num_train=80",
    "gan.num_eval=200",
    "gan.d_steps=2",
    "gan.r1_every=3",
    *[f"gan.{m}.{k}" for m in ("generator", "discriminator") for k in ("name=sgd", "momentum=0.9", "lr=0.01")],
]


def test_gan_two_processes_match_one_process(tmp_path):
    runs = tmp_path / "runs"
    two = launch(
        accelerate(),
        *GAN,
        f"output_dir={runs}",
        "run_name=two",
    )
    launch(PYTHON, *GAN, f"output_dir={runs}", "run_name=one")
    assert "2 process(es) x micro-batch 8 x accumulation 2 = global batch 32" in two.stdout
    assert "modes covered" in two.stdout and "high-quality samples" in two.stdout
    for run in ("one", "two"):
        assert sorted(os.listdir(runs / run)) == [
            "checkpoints",
            "config.yaml",
            "discriminator.safetensors",
            "generator.safetensors",
            "generator_ema.safetensors",
            "samples.png",
            "status.json",
        ]
    for model in ("generator", "discriminator"):
        w1, w2 = load_file(runs / "one" / f"{model}.safetensors"), load_file(runs / "two" / f"{model}.safetensors")
        for name in w1:
            torch.testing.assert_close(w2[name], w1[name], rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
