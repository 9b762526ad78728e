"""Speed features (issue 16): compilation, activation checkpointing, profiling and FLOP counts
leave the update as it was.

Compilation is tested with the aot_eager backend (Dynamo's capture and AOTAutograd's joint graph,
run by eager kernels: seconds to compile) in float64, where a compiled run's weights equal the eager
run's to 1e-12; the inductor backend (C++ code generation, ~20 s per compilation on 2 cores) has one
slow test in float32, to 1e-5.
"""

from __future__ import annotations

import functools
import json
import os
import tempfile

import pytest
import torch

from disttrain.config import ConfigError
from disttrain.speed.flops import counting_flops
from disttrain.speed.profiling import trace_path
from tests.cases import case_config
from tests.dist import run_distributed
from tests.workers import compiled_engine_cases, make_trainer, speed_cases

STEPS = 3
ACCUMULATION = 3
# seq2seq_aux has two forward signatures (length, tokens); with compile_dynamic=auto each is compiled
# for its first shapes, again with a dynamic length when a micro-batch's length differs, and again
# with a dynamic batch size at the short window's smaller micro-batch: 6, then none (measured over 8
# steps: 6 after step 2 and at step 8).
MAX_GRAPHS = 6


@functools.cache
def speed(world_size: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as out:
        return run_distributed(speed_cases, world_size, out, STEPS)


def assert_close(actual: dict, expected: dict, what: str, rtol: float, atol: float) -> None:
    assert actual.keys() == expected.keys() and expected
    for name in expected:
        torch.testing.assert_close(
            actual[name], expected[name], rtol=rtol, atol=atol, msg=lambda m, n=name: f"{what} {n}: {m}"
        )


@pytest.mark.slow  # compiling takes most of a minute: not in make test-quick
@pytest.mark.parametrize("world_size", (1, 2))
def test_compiled_weights_equal_eager_weights(world_size):
    for rank, result in enumerate(speed(world_size)):
        assert_close(result["compiled"], result["eager"], f"rank {rank} compiled vs eager", 1e-10, 1e-12)


@pytest.mark.slow  # compiling takes most of a minute: not in make test-quick
def test_compiled_ddp_still_reduces_once_per_window():
    rounds = speed(2)[0]["rounds"]
    for step in range(STEPS):
        start = rounds.index(("window", step)) + 1
        end = rounds.index(("window", step + 1)) if step + 1 < STEPS else len(rounds)
        window = rounds[start:end]  # cumulative rounds before each micro-step, then after the window
        assert len(window) >= 2, f"window {step}: {window}"
        # No all-reduce round while the window's non-last micro-steps run, then exactly one.
        assert window == [step] * (len(window) - 1) + [step + 1], (
            f"window {step}: cumulative all-reduce rounds {window}"
        )


@pytest.mark.slow  # compiling takes most of a minute: not in make test-quick
@pytest.mark.parametrize("world_size", (1, 2))
def test_variable_lengths_compile_a_bounded_number_of_graphs(world_size):
    for result in speed(world_size):
        assert 1 <= result["graphs"] <= MAX_GRAPHS, f"{result['graphs']} graphs compiled in {STEPS} steps"


@pytest.mark.slow  # compiling takes most of a minute: not in make test-quick
@pytest.mark.parametrize("world_size", (1, 2))
def test_activation_checkpointing_leaves_gradients_unchanged_with_dropout(world_size):
    for rank, result in enumerate(speed(world_size)):
        assert result["checkpointed_blocks"] == 2 and result["plain_blocks"] == 0  # one encoder, one decoder layer
        for step, (got, want) in enumerate(zip(result["checkpointed"], result["plain"], strict=True)):
            assert got.keys() == want.keys() and want
            for name in want:  # the same operations on the same dropout masks: bit for bit
                assert torch.equal(got[name], want[name]), f"rank {rank} step {step} {name}"


@pytest.mark.slow
def test_compiled_fsdp_and_deepspeed_match_eager():
    with tempfile.TemporaryDirectory() as out:
        ranks = run_distributed(compiled_engine_cases, 2, out, STEPS)
    for rank, result in enumerate(ranks):
        assert result["fsdp_compiled_graphs"] >= 1, "FSDP: nothing was compiled"
        assert_close(result["fsdp_compiled"], result["ddp"], f"rank {rank} FSDP compiled vs DDP eager", 1e-10, 1e-12)
        assert_close(result["zero2_compiled"], result["zero2"], f"rank {rank} ZeRO 2 compiled vs eager", 1e-5, 1e-6)


@pytest.mark.slow
def test_inductor_compiled_weights_equal_eager_weights(tmp_path):
    """The real code generator on one process (float32: inductor fuses and reorders sums)."""
    results = {}
    for name, extra in (("eager", []), ("inductor", ["compile=true"])):
        trainer = make_trainer(
            "classifier", "short", 2, str(tmp_path), STEPS, f"run_name={name}", *extra, float64=False
        )
        for step in range(STEPS):
            trainer.train_step(step)
        results[name] = {k: v.detach().clone() for k, v in trainer.recipe.models["model"].state_dict().items()}
    assert_close(results["inductor"], results["eager"], "inductor vs eager", 1e-5, 1e-6)


def test_profile_trace_holds_the_recorded_steps(tmp_path, capsys):
    from disttrain.trainer import Trainer

    cfg = case_config(
        "classifier",
        "short",
        1,
        1,
        str(tmp_path),
        5,
        "profile=true",
        "profile_start=1",
        "profile_steps=2",
        "tracker=none",
    )
    trainer = Trainer(cfg)
    trainer.fit()
    trainer.close()
    with open(trace_path(trainer.run_dir, 0)) as f:
        trace = json.load(f)
    steps = {e["name"] for e in trace["traceEvents"] if e.get("name", "").startswith("ProfilerStep#")}
    assert steps == {"ProfilerStep#1", "ProfilerStep#2"}
    assert any(e.get("name", "").startswith("aten::") for e in trace["traceEvents"]), "no operator events"
    printed = capsys.readouterr().out
    assert "profile: steps 2 to 3" in printed and "GFLOP/s" in printed
    assert not os.path.exists(trace_path(trainer.run_dir, 1))


def test_flop_count_of_a_small_model_is_the_hand_computed_one():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    x = torch.randn(3, 4)  # no gradient: the first layer's input gradient is never computed
    with counting_flops() as counted:
        model(x).sum().backward()
    forward = 2 * 3 * 4 * 8 + 2 * 3 * 8 * 2  # a [m, k] x [k, n] product is 2 m k n FLOPs
    backward = 2 * 3 * 8 * 2 * 2 + 2 * 3 * 4 * 8  # layer 2: input and weight gradients; layer 1: weight
    assert counted.total == forward + backward == 672


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["compile=true", "compile_backend=aot_eager", "compile_mode=max-autotune"], "inductor mode"),
        (["compile=true", "compile_backend=nope"], "compile_backend=nope is not one of"),
        (["compile_dynamic=maybe"], "compile_dynamic='maybe' is not one of"),
        (["profile=true", "profile_start=2", "profile_steps=2"], "exceeds steps=3"),
        (["activation_checkpointing_every=0"], "activation_checkpointing_every=0 must be >= 1"),
        (["gradient_checkpointing=true"], "did you mean 'activation_checkpointing'"),
    ],
)
def test_speed_keys_refused(tmp_path, args, message):
    with pytest.raises(ConfigError, match=message):
        case_config("classifier", "short", 1, 1, str(tmp_path), 3, *args)


def test_activation_checkpointing_needs_blocks(tmp_path):
    with pytest.raises(ConfigError, match="names no blocks"):
        make_trainer("classifier", "short", 1, str(tmp_path), 1, "activation_checkpointing=true")
