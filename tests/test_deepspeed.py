"""DeepSpeed ZeRO 1, 2 and 3 (real engines over gloo): the same exact update as the DDP path."""

from __future__ import annotations

import functools
import itertools
import re
import tempfile

import pytest

pytest.importorskip("deepspeed", reason="DeepSpeed is an extra: pip install -e '.[deepspeed]'")

from disttrain.config import ConfigError
from disttrain.preflight import resolve_config
from tests.cases import case_config
from tests.dist import run_distributed
from tests.reference import gan_reference_run, reference_run
from tests.test_equivalence import assert_same
from tests.workers import DEEPSPEED_CASE, run_engine_cases

pytestmark = pytest.mark.slow

STAGES = [f"configs/deepspeed/zero{s}.json" for s in ("1", "2", "3", "2_offload", "3_offload")]
RECIPES = ("classifier", "seq2seq", "gan")
# The offload variants move optimizer state, not the accumulation: accumulation 4 covers them.
CASES = [(r, "short", a, e) for r, a, e in itertools.product(RECIPES, (1, 4), STAGES) if a == 4 or "offload" not in e]
# R1 (lazy, hinge, 2 D steps) runs on ZeRO 1 and 2; ZeRO 3 is refused with it.
CASES += [("gan_r1", "short", a, e) for a, e in itertools.product((1, 4), STAGES[:2])]
# Activation checkpointing recomputes each block's forward in backward: under ZeRO 3 that gathers the
# block's partitioned parameters a second time.
CASES += [("seq2seq_ac", "short", 4, e) for e in STAGES[1:3]]
PARITY = [(r, "short", 4, "ddp") for r in ("classifier", "gan")]
STEPS = 3


@functools.cache
def results() -> dict:
    with tempfile.TemporaryDirectory() as out:
        return run_distributed(run_engine_cases, 2, CASES + PARITY, out, STEPS, timeout=600)[0]


@functools.cache
def reference(recipe: str) -> dict:
    with tempfile.TemporaryDirectory() as out:
        cfg = case_config(recipe, "short", 1, 1, out, STEPS, *DEEPSPEED_CASE[recipe])
        if recipe.startswith("gan"):
            return gan_reference_run(cfg, STEPS)["params"]
        return reference_run(cfg, STEPS, clip_per_model=True)["params"]


@pytest.mark.parametrize(
    ("recipe", "window", "accumulation", "engine"),
    CASES,
    ids=[f"{r}-acc{a}-{e.split('/')[-1][:-5]}" for r, _, a, e in CASES],
)
def test_deepspeed_update_equals_whole_batch_reference(recipe, window, accumulation, engine):
    # float32 engines against the float64 reference: a wrong scale or a missed step is off by O(1).
    got = {k: v.double() for k, v in results()[(recipe, window, accumulation, engine)].items()}
    assert_same(got, reference(recipe), f"{engine}", 1e-4, 2e-6)


@pytest.mark.parametrize("recipe", ["classifier", "gan"])
@pytest.mark.parametrize("stage", STAGES)
def test_deepspeed_and_ddp_paths_agree(recipe, stage):
    ddp = results()[(recipe, "short", 4, "ddp")]
    assert_same(results()[(recipe, "short", 4, stage)], ddp, f"{stage} vs DDP", 1e-5, 1e-6)


def test_a_deepspeed_file_that_disagrees_is_refused(tmp_path):
    bad = tmp_path / "ds.json"
    bad.write_text('{"zero_optimization": {"stage": 2}, "gradient_accumulation_steps": 8}')
    with pytest.raises(
        ConfigError, match=r'sets gradient_accumulation_steps=8 but the run config gives 2 .* set it to "auto"'
    ):
        resolve_config([f"deepspeed_config={bad}", "global_batch_size=32", "micro_batch_size=8"], world_size=2)
    bad.write_text('{"zero_optimization": {"stage": 2}, "gradient_clipping": 1.0}')
    with pytest.raises(ConfigError, match=re.escape('sets gradient_clipping=1.0; set it to "auto"')):
        resolve_config([f"deepspeed_config={bad}"], world_size=1)
    bad.write_text('{"zero_optimization": {"stage": 2}, "bf16": {"enabled": true}}')
    with pytest.raises(ConfigError, match="enables bf16 but mixed_precision=no"):
        resolve_config([f"deepspeed_config={bad}"], world_size=1)


def test_seq2seq_optimizers_that_cannot_share_an_engine_are_refused():
    with pytest.raises(
        ConfigError, match=re.escape("one optimizer per model: seq2seq.encoder.name=sgd and seq2seq.decoder.name=adamw")
    ):
        resolve_config(["deepspeed_config=configs/deepspeed/zero2.json", "seq2seq.encoder.name=sgd"], world_size=1)
    with pytest.raises(ConfigError, match="one global norm per model"):
        resolve_config(
            ["deepspeed_config=configs/deepspeed/zero2.json", "seq2seq.encoder.clip_grad_norm=0.5"], world_size=1
        )


def test_r1_under_zero_3_is_refused():
    for stage in ("3", "3_offload"):
        with pytest.raises(ConfigError, match=r"gan.r1_gamma>0 is not supported under ZeRO stage 3 .* use ZeRO 1 or 2"):
            resolve_config(["recipe=gan", f"deepspeed_config=configs/deepspeed/zero{stage}.json"], world_size=1)
    for stage in ("1", "2", "2_offload"):
        resolve_config(["recipe=gan", f"deepspeed_config=configs/deepspeed/zero{stage}.json"], world_size=1)


def test_accelerate_launch_with_a_deepspeed_config_matches_one_ddp_process(tmp_path):
    import os
    import subprocess

    import torch
    from safetensors.torch import load_file

    from tests.launcher import PYTHON, accelerate, launch
    from tests.test_launch import SGD
    from tests.test_reliability import flip_a_bit

    runs = tmp_path / "runs"
    # Clipping off: DeepSpeed clips one norm per model, the DDP path one per optimizer.
    same = [*SGD, "seq2seq.encoder.clip_grad_norm=0", "seq2seq.decoder.clip_grad_norm=0", f"output_dir={runs}"]
    config = "configs/accelerate/deepspeed_zero2.yaml"
    zero2 = launch(
        accelerate(config),
        *same,
        "run_name=zero2",
        timeout=300,
    )
    launch(PYTHON, *same, "run_name=ddp")
    assert "2 process(es) x micro-batch 4 x accumulation 2 = global batch 16" in zero2.stdout
    assert "deepspeed_config: configs/deepspeed/zero2.json" in (runs / "zero2" / "config.yaml").read_text()
    assert (
        sorted(os.listdir(runs / "zero2"))
        == sorted(os.listdir(runs / "ddp"))
        == ["checkpoints", "config.yaml", "seq2seq.safetensors", "status.json"]
    )
    a, b = load_file(runs / "zero2" / "seq2seq.safetensors"), load_file(runs / "ddp" / "seq2seq.safetensors")
    for name in b:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")

    # Export checks the run checkpoint's manifest first, as resume does: one changed byte in an
    # optimizer's shard would otherwise become weights off by about 1e-3, exported without a word.
    step = sorted((runs / "zero2" / "checkpoints").glob("step-*"))[-1]
    model = sorted((step / "deepspeed").iterdir())[0]
    export = [*PYTHON, "-m", "disttrain.export", str(model), str(tmp_path / "exported.safetensors")]
    assert subprocess.run(export, capture_output=True, text=True, timeout=120).returncode == 0
    (shard,) = sorted(model.glob("state/*optim_states.pt"))[:1]
    flip_a_bit(shard)
    refused = subprocess.run(export, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 1 and refused.stderr.strip().splitlines() == [
        f"export: checkpoint {step} is damaged: {shard.relative_to(step)} does not match its recorded checksum "
        "(its bytes changed)"
    ]


@pytest.mark.parametrize("stage", ["configs/deepspeed/zero2.json", "configs/deepspeed/zero3.json"])
def test_a_deepspeed_checkpoint_becomes_one_safetensors_file(tmp_path, stage):
    import subprocess
    import sys

    import torch
    from safetensors.torch import load_file

    from tests.workers import save_deepspeed_checkpoint

    trained = run_distributed(save_deepspeed_checkpoint, 2, stage, str(tmp_path))[0]
    out = tmp_path / "weights.safetensors"
    done = subprocess.run(
        [sys.executable, "-m", "disttrain.export", str(tmp_path / "checkpoint"), str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    exported = load_file(out)
    assert {f"model.{k}" for k in exported} == trained.keys()
    for name, value in exported.items():
        torch.testing.assert_close(value, trained[f"model.{name}"], rtol=0, atol=0)


def test_bf16_under_deepspeed_trains_recipes_with_float_inputs():
    # DeepSpeed casts the weights to bf16 but not the inputs; the trainer autocasts them. Against the
    # float64 reference at bf16's precision: a wrong scale or a missed step is off by O(1).
    cases = [(r, "short", 4, "configs/deepspeed/zero2.json") for r in ("classifier", "gan")]
    with tempfile.TemporaryDirectory() as out:
        got = run_distributed(run_engine_cases, 2, cases, out, STEPS, "mixed_precision=bf16", timeout=300)[0]
    for case in cases:
        assert_same({k: v.double() for k, v in got[case].items()}, reference(case[0]), f"bf16 {case}", 3e-2, 3e-3)


@pytest.mark.parametrize(
    "saved, words", [(1, "partitions of 1 process, this run has 2; resume on 1 process"), (4, "of 4 processes")]
)
def test_a_deepspeed_checkpoint_of_another_process_count_is_refused_in_words(saved, words):
    from types import SimpleNamespace

    from disttrain.engines.deepspeed import DeepSpeedEngine
    from disttrain.safe_files import CheckpointError

    with pytest.raises(CheckpointError, match=words):
        DeepSpeedEngine.check_resumable(SimpleNamespace(world_size=2), saved, "runs/r/checkpoints/step-00000004")
