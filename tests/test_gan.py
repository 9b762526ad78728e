"""GAN: alternating D and G phases that stay exact under accumulation and DDP, with no pollution."""

from __future__ import annotations

import functools
import itertools
import tempfile

import pytest
import torch
import torch.nn.functional as F

from tests.cases import GAN_RECIPES, case_config
from tests.dist import run_distributed
from tests.reference import gan_reference_run
from tests.test_equivalence import assert_same
from tests.workers import run_cases, watch_gan_phases

WORLDS = (1, 2, 4)
ACCUMULATIONS = (1, 2, 4)
STEPS = 3
CASES = list(itertools.product(GAN_RECIPES, ("full", "short", "tiny"), ACCUMULATIONS))


@functools.cache
def distributed(world_size: int) -> dict:
    with tempfile.TemporaryDirectory() as out:
        return run_distributed(run_cases, world_size, CASES, out, STEPS)


@functools.cache
def reference(recipe: str, window: str) -> dict:
    with tempfile.TemporaryDirectory() as out:
        return gan_reference_run(case_config(recipe, window, 1, 1, out, STEPS), STEPS)


@pytest.mark.parametrize("world_size", WORLDS, ids=[f"world{w}" for w in WORLDS])
@pytest.mark.parametrize(("recipe", "window", "accumulation"), CASES, ids=[f"{r}-{w}-acc{a}" for r, w, a in CASES])
def test_both_phases_equal_the_whole_batch_reference(world_size, recipe, window, accumulation):
    ref = reference(recipe, window)
    for rank, results in enumerate(distributed(world_size)):
        got = results[(recipe, window, accumulation)]
        assert len(got["grads"]) == len(ref["grads"])
        for i, (actual, expected) in enumerate(zip(got["grads"], ref["grads"], strict=True)):
            assert_same(actual, expected, f"rank {rank} phase window {i} gradient", 1e-9, 1e-12)
        assert_same(got["params"], ref["params"], f"rank {rank} G, D and EMA after {STEPS} steps", 1e-9, 1e-11)


@functools.cache
def phase_log() -> list[list[dict]]:
    with tempfile.TemporaryDirectory() as out:
        return [r["log"] for r in run_distributed(watch_gan_phases, 2, 3, out)]


def test_phases_leave_the_other_model_untouched():
    log = phase_log()[0]
    assert [e["phase"] for e in log] == ["discriminator", "discriminator", "generator"] * 2
    assert any("r1" in e["terms"] for e in log) and any("r1" not in e["terms"] for e in log)
    for e in log:
        assert e["other_unchanged"], f"{e['phase']} phase changed the other model's weights"
        assert e["other_state_unchanged"], f"{e['phase']} phase changed the other model's optimizer state"
        assert e["other_grads"] == [], f"{e['phase']} phase left gradients in the other model: {e['other_grads']}"


def test_each_phase_syncs_its_own_model_once_and_never_the_other():
    for e in phase_log()[0]:
        trained = e["phase"]
        other = "generator" if trained == "discriminator" else "discriminator"
        assert e["rounds"][trained] == 1, f"{trained} phase: {e['rounds'][trained]} all-reduce rounds of {trained}"
        assert e["rounds"][other] == 0, f"{trained} phase synchronised {other}"


def test_gradients_differ_between_boundaries_and_agree_at_them():
    rank0, rank1 = phase_log()
    for a, b in zip(rank0, rank1, strict=True):
        *inner, last = range(len(a["snapshots"]))
        for i in inner:
            assert any(not torch.equal(a["snapshots"][i][k], b["snapshots"][i][k]) for k in a["snapshots"][i]), (
                f"{a['phase']} micro-step {i}: ranks already synchronised"
            )
        assert a["snapshots"][last].keys() == b["snapshots"][last].keys()
        assert all(torch.equal(a["snapshots"][last][k], b["snapshots"][last][k]) for k in a["snapshots"][last])


def textbook_gan_step(broken: bool) -> dict[str, torch.Tensor]:
    """One G then D update in plain PyTorch, as a textbook GAN example writes it: correct, or the broken ordering
    (D not frozen during the G phase, zero_grad after step) where D trains on G's gradients."""
    torch.manual_seed(0)
    G, D = (
        torch.nn.Linear(4, 2).double(),
        torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).double(),
    )
    g_opt, d_opt = torch.optim.SGD(G.parameters(), lr=0.1), torch.optim.SGD(D.parameters(), lr=0.1)
    z, real = torch.randn(16, 4, dtype=torch.float64), torch.randn(16, 2, dtype=torch.float64)
    if not broken:
        D.requires_grad_(False)
        g_opt.zero_grad(set_to_none=True)
    fake = G(z)
    F.softplus(-D(fake)).mean().backward(retain_graph=True)
    g_opt.step()
    D.requires_grad_(True)
    if broken:
        g_opt.zero_grad(set_to_none=True)
    else:
        d_opt.zero_grad(set_to_none=True)
    (F.softplus(-D(real)).mean() + F.softplus(D(fake.detach())).mean()).backward()
    d_opt.step()
    return {k: v.detach().clone() for k, v in D.state_dict().items()}


def test_the_seeds_broken_ordering_trains_d_on_gs_gradients():
    right, wrong = textbook_gan_step(broken=False), textbook_gan_step(broken=True)
    assert any(not torch.allclose(right[k], wrong[k]) for k in right)


def test_a_recipe_that_forgets_to_freeze_d_is_stopped(tmp_path):
    """The regression the seed warns about cannot pass silently: gradients that reach D in the G
    phase are refused before they are applied."""
    from tests.workers import make_trainer

    trainer = make_trainer("gan", "full", 1, str(tmp_path))
    generator_phase = trainer.recipe.phases(0)[-1]
    generator_phase.frozen = ()
    with pytest.raises(RuntimeError, match="phase 'generator' left gradients in 'discriminator'"):
        trainer.backward_window(generator_phase)
