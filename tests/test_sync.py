"""Gradient sync: skipped on every micro-step but the last, one all-reduce round per window."""

from __future__ import annotations

import tempfile

import pytest
import torch

from tests.dist import run_distributed
from tests.workers import watch_sync

ACCUMULATION = 3


def differs(a: dict, b: dict) -> bool:
    return any(not torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("recipe", ["classifier", "seq2seq_aux"])
def test_ranks_differ_between_boundaries_and_agree_at_them(recipe):
    with tempfile.TemporaryDirectory() as out:
        ranks = run_distributed(watch_sync, 2, recipe, ACCUMULATION, out)
    snapshots = [r["snapshots"] for r in ranks]
    per_window = ACCUMULATION + 1  # before micro-step 0, after each micro-step
    for window in range(2):
        first = window * per_window
        assert snapshots[0][first] == {} and snapshots[1][first] == {}, "gradients leaked into the next window"
        for micro in range(1, ACCUMULATION):
            a, b = snapshots[0][first + micro], snapshots[1][first + micro]
            assert a.keys() == b.keys() and a
            assert differs(a, b), f"window {window} micro-step {micro}: ranks already synchronised"
        a, b = snapshots[0][first + ACCUMULATION], snapshots[1][first + ACCUMULATION]
        assert a.keys() == b.keys() and a
        assert not differs(a, b), f"window {window}: ranks disagree at the boundary"


@pytest.mark.parametrize("recipe", ["classifier", "seq2seq_aux"])
def test_one_allreduce_round_per_optimizer_step(recipe):
    with tempfile.TemporaryDirectory() as out:
        calls = run_distributed(watch_sync, 2, recipe, ACCUMULATION, out)[0]["calls"]
    per_window = ACCUMULATION + 1
    windows = [calls[w * per_window : (w + 1) * per_window] for w in range(2)]
    for w, rounds in enumerate(windows):
        # No all-reduce while the window's non-last micro-steps run, then exactly one round.
        assert rounds == [w] * ACCUMULATION + [w + 1], f"window {w}: cumulative all-reduce rounds {rounds}"
