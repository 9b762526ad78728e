"""What ends a run early, and how: a dead or hung process, a non-finite loss."""

from __future__ import annotations

import os

import pytest
import torch

from disttrain.config import ConfigError
from disttrain.preflight import resolve_config
from disttrain.trainer import Trainer
from tests.dist import run_distributed
from tests.workers import environment, fail_one_rank, poisoned_steps


def test_processes_see_the_callers_environment_as_it_is_when_they_start(tmp_path, monkeypatch):
    """They fork from a server started earlier, whose own environment is the one it started with."""
    run_distributed(environment, 1, "DISTTRAIN_PROBE")  # the server is up (if no test started it yet)
    monkeypatch.setenv("DISTTRAIN_PROBE", str(tmp_path))
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    assert run_distributed(environment, 2, "DISTTRAIN_PROBE") == [(str(tmp_path), str(tmp_path))] * 2


@pytest.mark.parametrize("how", ["dies", "hangs"])
def test_a_dead_or_hung_process_ends_the_run_with_a_clear_error(tmp_path, how):
    with pytest.raises(RuntimeError) as e:
        run_distributed(fail_one_rank, 2, how, str(tmp_path), timeout=60)
    message = str(e.value)
    assert message.startswith("rank 0 of 2 failed"), message[-1500:]
    assert "another process died or hung for more than collective_timeout_s=3" in message, message[-1500:]


def test_a_nan_on_one_process_skips_that_update_everywhere(tmp_path):
    ranks = run_distributed(poisoned_steps, 2, str(tmp_path), 2, 1)
    for r in ranks:
        assert r["moved"] == [True, True, False, True] and r["skipped"] == 1
    for name, value in ranks[0]["params"].items():
        assert torch.isfinite(value).all() and torch.equal(value, ranks[1]["params"][name]), name


def test_a_nan_stops_the_run_with_the_state_before_it(tmp_path):
    args = ["recipe=classifier", "steps=5", "progress_bar=false", f"output_dir={tmp_path}", "run_name=run"]
    trainer = Trainer(resolve_config([*args, "on_nonfinite=stop"], world_size=1))
    losses = trainer.recipe.losses
    trainer.recipe.losses = lambda models, batch: ((t, loss * torch.nan) for t, loss in losses(models, batch))
    with pytest.raises(
        FloatingPointError, match="step 1: the 'train' loss or gradient is not finite; the state before"
    ):
        trainer.fit()
    assert os.path.isdir(tmp_path / "run" / "checkpoints" / "step-00000000")


def test_skipping_is_refused_under_deepspeed():
    with pytest.raises(ConfigError, match="on_nonfinite=skip is not supported under DeepSpeed"):
        resolve_config(["on_nonfinite=skip", "deepspeed_config=configs/deepspeed/zero2.json"], world_size=1)


def test_background_checkpoints_are_refused_under_deepspeed():
    with pytest.raises(ConfigError, match="checkpoint_async=true is not supported under DeepSpeed"):
        resolve_config(["checkpoint_async=true", "deepspeed_config=configs/deepspeed/zero2.json"], world_size=1)
