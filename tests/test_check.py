"""`python -m disttrain.check`: passes on the built-in recipes and a user's, and names seeded mistakes.

The built-in recipes keep their hand-written references (test_equivalence.py, test_gan.py): a bug
shared by the check and the accumulation core must not hide. This is an addition.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys

import pytest

from disttrain.check import inspect_recipe, run_check
from tests.cases import TINY_GAN, TINY_SEQ2SEQ
from tests.launcher import REPO

pytestmark = pytest.mark.slow

BROKEN = "recipe=tests.fixture_recipes.broken"


def verdicts(*args: str) -> dict[str, tuple[str, str, str]]:
    found, _ = run_check(list(args))
    return {v.check: (v.status, v.detail, v.fix) for v in found}


@pytest.mark.parametrize(
    "args",
    [
        ["recipe=classifier", "classifier.hidden=16", "--worlds", "2"],
        ["recipe=seq2seq", *TINY_SEQ2SEQ, "--worlds", "2"],
        ["recipe=gan", *TINY_GAN, "gan.d_steps=2", "gan.r1_every=2", "--worlds", "2"],
        # outside the package, on 4 processes (the default checks 2 and 4; the others here run 2)
        ["recipe=tests.fixture_recipes.regression", "--worlds", "4"],
    ],
)
def test_the_check_passes_on_correct_recipes(args):
    found = verdicts(*args)
    assert all(status == "PASS" for status, _, _ in found.values()), found
    worlds = (int(args[args.index("--worlds") + 1]),)
    assert {c for c in found if "processes," in c} == {
        f"{w} processes, {case}"
        for w in worlds
        for case in ("shorter last window", "window shorter than the processes")
    }


@pytest.mark.parametrize("engine", ["deepspeed_config=configs/deepspeed/zero2.json", "fsdp.enabled=true"])
def test_the_check_runs_on_deepspeed_and_fsdp_and_still_finds_a_mean(engine):
    found = verdicts(BROKEN, engine, "--worlds", "2")
    assert all(status == "PASS" for status, _, _ in found.values()), found
    assert "final weights equal the reference" in found["2 processes, shorter last window"][1]
    mean = verdicts(BROKEN, engine, "broken.bug=mean", "--worlds", "2")
    assert mean["2 processes, shorter last window"][0] == "FAIL"
    assert mean["2 processes, shorter last window"][2], "a FAIL without a fix line"


def test_the_command_prints_a_verdict_per_check_and_exits_by_them():
    ok = subprocess.run(
        [sys.executable, "-m", "disttrain.check", BROKEN, "--worlds", "2"], cwd=REPO, capture_output=True, text=True
    )
    assert ok.returncode == 0 and ok.stdout.rstrip().endswith("all 5 checks passed"), ok.stdout + ok.stderr
    assert "reference: 1 process, each global batch of 24 as one micro-batch" in ok.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "disttrain.check", BROKEN, "broken.bug=mean", "--worlds", "2"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 1 and "  FAIL  loss 'fit' (critic) is not a sum over items" in bad.stdout
    # A mean instead of a sum is named, with the factor it is off by and the fix.
    assert (
        "  FAIL  2 processes, shorter last window: "
        "the gradients are 6 x the reference's (the micro-batches of a window)" in bad.stdout
    ), bad.stdout
    assert "        fix: losses() returns a mean, not a sum" in bad.stdout, bad.stdout
    typo = subprocess.run(
        [sys.executable, "-m", "disttrain.check", BROKEN, "broken.bgu=mean"], cwd=REPO, capture_output=True, text=True
    )
    assert typo.returncode == 2 and "did you mean 'broken.bug'" in typo.stderr


def test_a_wrong_item_count_is_named():
    found = verdicts(BROKEN, "broken.bug=count", "--worlds", "2")
    status, detail, _ = found["item count of 'fit' (critic)"]
    assert status == "FAIL" and detail == "item_counts() gives 4 for a batch and 8 for its two halves together"
    assert found["2 processes, shorter last window"][2] == "item_counts() does not count what the loss sums over"


@functools.cache
def two_mistakes() -> dict[str, tuple[str, str, str]]:
    """One check of a recipe with two independent mistakes, each found by its own one-process check.
    (An unused parameter makes DDP fail before the others are seen: it is checked alone.)"""
    return verdicts(BROKEN, "broken.bug=unfrozen+random", "--worlds", "2")


def test_a_phase_that_does_not_freeze_the_other_model_is_named():
    status, detail, fix = two_mistakes()["the reference (1 process), shorter last window"]
    assert status == "FAIL" and "phase 'maker' left gradients in 'critic'" in detail and "Phase.frozen" in fix


def test_a_dataset_that_changes_its_samples_is_named():
    status, _, fix = two_mistakes()["dataset: the same index gives the same sample"]
    assert status == "FAIL" and "(seed, epoch, index)" in fix


def test_an_unused_parameter_without_find_unused_parameters_is_named():
    found = verdicts(BROKEN, "broken.bug=unused", "--worlds", "2")
    status, detail, fix = found["every trainable parameter gets a gradient"]
    assert status == "FAIL" and "critic.spare.weight" in detail and "find_unused_parameters = True" in fix


@pytest.mark.parametrize(
    "bug, named",
    [
        ("world", "the gradients are 1/2 x the reference's (the world size)"),
        ("mean", "the gradients are 6 x the reference's (the micro-batches of a window)"),
    ],
)
def test_a_batchnorm_model_is_checked_with_frozen_statistics_and_its_bugs_named(bug, named):
    found = verdicts(BROKEN, "broken.batchnorm=true", f"broken.bug={bug}", "--worlds", "2")
    status, detail, fix = found["BatchNorm"]
    assert status == "WARN" and "statistics frozen" in detail and "GroupNorm or LayerNorm" in fix
    for case in ("shorter last window", "window shorter than the processes"):
        status, detail, _ = found[f"2 processes, {case}"]
        assert status == "FAIL" and detail.startswith(named), found


def test_float32_rounding_that_an_adaptive_optimizer_amplifies_is_no_failure():
    """The shift's gradient is zero but for rounding, which RMSprop turns into whole steps: a fixed
    float32 tolerance fails this correct recipe; the one derived from the two references does not."""
    rmsprop = ["broken.shift=true", "broken.optimizer.name=torch.optim.RMSprop", "broken.optimizer.lr=0.01"]
    found = verdicts(BROKEN, *rmsprop, "--float32", "--worlds", "2")
    assert all(status == "PASS" for status, _, _ in found.values()), found
    assert "(tolerance there" in found["2 processes, shorter last window"][1]
    # and the derived tolerance still sees the process count's mistake
    world = verdicts(BROKEN, *rmsprop, "broken.bug=world", "--float32", "--worlds", "2")
    assert world["2 processes, shorter last window"][1].startswith("the gradients are 1/2 x the reference's")


@pytest.mark.parametrize("count, status", [("tokens", "PASS"), ("sequences", "WARN")])
def test_a_loss_over_tokens_counted_in_sequences_is_warned(count, status, tmp_path):
    found = {
        v.check: v
        for v in inspect_recipe(
            ["recipe=tests.fixture_recipes.sequences", f"sequences.count={count}"], str(tmp_path), True
        )
    }
    verdict = found["items of 'tokens' (train) are its scored tokens"]
    assert verdict.status == status
    if status == "WARN":
        assert "it counts sequences" in verdict.detail and "A per-sequence weighting may be intended" in verdict.detail
        assert verdict.fix == "for the mean over tokens, count the scored tokens: (labels != -100).sum()"
    assert all(v.status == "PASS" for c, v in found.items() if not c.startswith("items of")), found


def test_a_failure_never_blames_a_check_that_passed():
    import torch

    from disttrain.check import Run, Tolerance, compare

    reference = Run(grads=[{"w": torch.tensor([1.0, 2.0])}], params={"w": torch.tensor([3.0, 4.0])})
    skewed = Run(grads=[{"w": torch.tensor([1.0, 2.5])}], params={"w": torch.tensor([3.0, 4.0])})
    verdict = compare(2, "case", skewed, reference, Tolerance(1e-4), False, inspected_ok=True)
    assert verdict.status == "FAIL" and "the one-process checks above pass" in verdict.fix
    assert "see the checks above" in compare(2, "case", skewed, reference, Tolerance(1e-4), False, False).fix
    stepped = Run(grads=reference.grads, params={"w": torch.tensor([3.0, 4.1])})
    verdict = compare(2, "case", stepped, reference, Tolerance(1e-4), False, inspected_ok=True)
    assert verdict.status == "FAIL" and verdict.detail.startswith("the gradients at all 1 boundaries equal")
    assert verdict.fix.startswith("the accumulation is exact; the optimizer step differs")


@pytest.mark.parametrize(
    "deepspeed_config, named",
    [
        ("configs/deepspeed/zero2.json", "DeepSpeed ZeRO 2"),
        ("configs/deepspeed/zero3_offload.json", "DeepSpeed ZeRO 3, optimizer state offloaded to cpu"),
    ],
)
def test_the_header_names_the_zero_stage_and_what_is_offloaded(deepspeed_config, named):
    from disttrain.check import engine_name
    from disttrain.preflight import resolve_config

    cfg = resolve_config([BROKEN, f"deepspeed_config={deepspeed_config}", "tracker=none"], world_size=1)
    assert engine_name(cfg) == named


def test_a_loss_that_is_not_finite_is_named_as_such_and_nothing_is_compared():
    found = verdicts(BROKEN, "broken.bug=nan", "--worlds", "2")
    status, detail, fix = found["loss 'fit' (critic) is finite"]
    assert status == "FAIL" and detail == "it is nan on the first 8 samples" and "a log of 0" in fix
    assert not any("sum over items" in c or "processes" in c for c in found), found


def test_command_line_mistakes_are_one_line(tmp_path):
    for args, said in [
        (["--worlds", "x"], "--worlds needs process counts separated by commas, e.g. --worlds 2,4 (got 'x')"),
        (["--worlds"], "--worlds needs process counts separated by commas, e.g. --worlds 2,4 (got '')"),
    ]:
        done = subprocess.run(
            [sys.executable, "-m", "disttrain.check", *args], cwd=REPO, capture_output=True, text=True
        )
        assert done.returncode == 1 and done.stderr.strip().splitlines() == [said], done.stderr
    (tmp_path / "mypkg").mkdir()
    (tmp_path / "mypkg" / "__init__.py").write_text("")
    (tmp_path / "mypkg" / "recipe.py").write_text("def broken(:\n    pass\n")
    done = subprocess.run(
        [sys.executable, "-m", "disttrain.check", "recipe=mypkg.recipe"],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
    )
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        f"config error: recipe=mypkg.recipe: invalid syntax in {tmp_path / 'mypkg' / 'recipe.py'}, line 1; "
        "fix the recipe file"
    ], done.stderr
