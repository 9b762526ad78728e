"""End to end through the real launchers: `accelerate launch` with 2 CPU processes, and `python`."""

from __future__ import annotations

import os

import pytest
import torch
from accelerate.utils import set_seed
from safetensors.torch import load_file

from disttrain.preflight import resolve_config
from disttrain.recipes.seq2seq.recipe import Seq2Seq
from tests.launcher import PYTHON, REPO, accelerate, launch

pytestmark = pytest.mark.slow


# SGD keeps float32 rounding at rounding size. Adam would not: a few gradients are zero in exact
# arithmetic (attention key biases: softmax ignores a constant shift) and pure rounding noise in
# float32, and Adam normalises that noise into steps of the learning rate's size.
SGD = [f"seq2seq.{part}.{key}" for part in ("encoder", "decoder") for key in ("name=sgd", "momentum=0.9", "lr=0.05")]


def test_two_processes_match_one_process(tmp_path):
    runs = tmp_path / "runs"
    two = launch(
        accelerate(),
        f"output_dir={runs}",
        "run_name=two",
        *SGD,
    )
    one = launch(PYTHON, f"output_dir={runs}", "run_name=one", *SGD)

    assert sorted(os.listdir(runs)) == ["one", "two"], "one run directory per run, none per process"
    assert "2 process(es) x micro-batch 4 x accumulation 2 = global batch 16" in two.stdout
    assert "1 process(es) x micro-batch 4 x accumulation 4 = global batch 16" in one.stdout
    assert two.stdout.count("done: 6 steps") == 1, "the summary is printed by the main process only"
    resolved = (runs / "two" / "config.yaml").read_text()
    assert "global_batch_size: 16" in resolved and "run_name: two" in resolved

    w2, w1 = load_file(runs / "two" / "seq2seq.safetensors"), load_file(runs / "one" / "seq2seq.safetensors")
    assert w1.keys() == w2.keys()
    for name in w1:
        torch.testing.assert_close(w2[name], w1[name], rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")

    # Both runs trained: the weights moved away from the seed's initialisation.
    set_seed(0)
    initial = Seq2Seq(resolve_config(["config=" + os.path.join(REPO, "configs/debug.yaml")], world_size=1).seq2seq)
    moved = max(float((w1[n] - p.detach()).abs().max()) for n, p in initial.state_dict().items())
    assert moved > 1e-3


SHIPPED_LAUNCH_CONFIGS = sorted(
    n for n in os.listdir(os.path.join(REPO, "configs", "accelerate")) if n.endswith(".yaml")
)


def test_bf16_trains_under_the_shipped_launch_configs(tmp_path):
    """The shipped configs name no precision, so the launcher exports its default ("no"): not a
    conflict with the run's mixed_precision=bf16 (bf16 autocast runs on CPU). One config per engine
    runs; every shipped config is of that kind, naming no precision."""
    import yaml

    for config in SHIPPED_LAUNCH_CONFIGS:
        with open(os.path.join(REPO, "configs", "accelerate", config)) as f:
            assert "mixed_precision" not in yaml.safe_load(f), f"{config}: precision lives in the run config"
    for config in ("ddp.yaml", "deepspeed_zero2.yaml", "fsdp2.yaml"):
        name = config.removesuffix(".yaml")
        args = ["recipe=classifier", "steps=2", "mixed_precision=bf16", "tracker=none", "progress_bar=false"]
        done = launch(accelerate(f"configs/accelerate/{config}"), *args, f"output_dir={tmp_path}", f"run_name={name}")
        assert "done: 2 steps" in done.stdout, f"{config}: {done.stdout[-2000:]}"
        assert "mixed_precision: bf16" in (tmp_path / name / "config.yaml").read_text(), config
