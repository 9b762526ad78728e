"""The promise: whatever the world size, accumulation or window shape, the update equals the one a
single process makes on the whole global batch (float64, independent reference)."""

from __future__ import annotations

import functools
import itertools
import tempfile

import pytest
import torch

from tests.cases import RECIPES, WINDOWS, case_config
from tests.dist import run_distributed
from tests.reference import reference_run
from tests.workers import run_cases, run_naive

WORLDS = (1, 2, 4)
ACCUMULATIONS = (1, 3, 4)
STEPS = 3
CASES = list(itertools.product(RECIPES, WINDOWS, ACCUMULATIONS))
# Activation checkpointing recomputes a block's forward inside backward, where no_sync must still
# hold: on 2 processes; 1 and 4 add nothing for it.
RUN = {w: [c for c in CASES if c[0] != "seq2seq_ac" or w == 2] for w in WORLDS}


@functools.cache
def distributed(world_size: int) -> dict:
    """Every case of one world size in one process group (spawning is the expensive part)."""
    with tempfile.TemporaryDirectory() as out:
        results = run_distributed(run_cases, world_size, RUN[world_size], out, STEPS)
    return results


@functools.cache
def reference(recipe: str, window: str) -> dict:
    # The reference depends on the global batch only, not on how it is split.
    with tempfile.TemporaryDirectory() as out:
        return reference_run(case_config(recipe, window, 1, 1, out, STEPS), STEPS)


def assert_same(actual: dict, expected: dict, what: str, rtol: float, atol: float) -> None:
    assert actual.keys() == expected.keys(), f"{what}: parameters with gradients differ"
    for name in expected:
        torch.testing.assert_close(
            actual[name], expected[name], rtol=rtol, atol=atol, msg=lambda m, name=name: f"{what} {name}: {m}"
        )


@pytest.mark.parametrize(
    ("recipe", "window", "accumulation", "world_size"),
    [(*c, w) for w in WORLDS for c in RUN[w]],
    ids=[f"{r}-{win}-acc{a}-world{w}" for w in WORLDS for r, win, a in RUN[w]],
)
def test_update_equals_whole_batch_reference(world_size, recipe, window, accumulation):
    ranks = distributed(world_size)
    ref = reference(recipe, window)
    for rank, results in enumerate(ranks):
        got = results[(recipe, window, accumulation)]
        for step in range(STEPS):
            assert_same(got["grads"][step], ref["grads"][step], f"rank {rank} step {step} gradient", 1e-9, 1e-12)
        assert_same(got["params"], ref["params"], f"rank {rank} parameters after {STEPS} steps", 1e-9, 1e-11)


@pytest.mark.parametrize("world_size", (2, 4))
def test_seq2seq_cases_have_uneven_token_counts_across_ranks(world_size):
    """Guards the matrix itself: the token cases must really give ranks different token counts."""
    ranks = distributed(world_size)
    for window in WINDOWS:
        per_rank = [r[("seq2seq", window, 1)]["items"][0] for r in ranks]
        assert len(set(per_rank)) > 1, f"{window}: every rank saw {per_rank[0]} tokens"


def test_short_windows_exercise_stand_ins():
    """With 3 samples in a window and 4 processes one process has nothing: it must still join."""
    ranks = distributed(4)
    assert [r[("classifier", "tiny", 1)]["items"][1] for r in ranks] == [1, 1, 1, 0]


@pytest.mark.parametrize(("recipe", "window", "fails_on"), [("classifier", "short", [1]), ("seq2seq", "full", [0, 1])])
def test_naive_scaling_fails_where_the_core_does_not(recipe, window, fails_on):
    """Dividing the micro-batch mean by the configured count (what peers do) is wrong for a shorter
    last window and for token losses; on a full window of per-sample losses it happens to be right,
    which is why the matrix needs the short windows to catch a regression to it."""
    with tempfile.TemporaryDirectory() as out:
        naive = run_distributed(run_naive, 2, recipe, window, 3, out)[0]
    ref = reference(recipe, window)
    for step in range(2):
        if step in fails_on:
            with pytest.raises(AssertionError):
                assert_same(naive[step], ref["grads"][step], f"naive step {step}", 1e-9, 1e-12)
        else:
            assert_same(naive[step], ref["grads"][step], f"naive step {step}", 1e-9, 1e-12)
