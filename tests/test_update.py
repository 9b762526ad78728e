"""The boundary: fp16 loss scaling with several optimizers, schedules, learning-rate scaling."""

from __future__ import annotations

import math

import pytest
import torch

from disttrain.config import OptimizerConfig
from disttrain.optim import schedule_factor
from disttrain.preflight import resolve_config
from disttrain.trainer import Trainer
from tests.cases import case_config
from tests.reference import named_params


def tiny_seq2seq(tmp_path, *extra: str) -> Trainer:
    cfg = case_config("seq2seq", "short", 1, 3, str(tmp_path))
    for item in extra:
        key, value = item.split("=")
        setattr(cfg, key, type(getattr(cfg, key))(value))
    return Trainer(cfg)


def with_cpu_grad_scaler(trainer: Trainer, scale: float) -> torch.amp.GradScaler:
    # Accelerate makes a GradScaler only for fp16 on a GPU; torch's CPU scaler exercises the same
    # boundary code (unscale, clip, step, update) on this machine.
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=scale, growth_interval=1000)
    return trainer.accelerator.scaler


def test_loss_scaling_unscales_once_for_every_optimizer(tmp_path):
    """A power-of-two loss scale is exact in floating point: the scaled run must equal the plain one.
    Accelerate's own optimizer wrapper would unscale the second optimizer twice."""
    plain = tiny_seq2seq(tmp_path)
    for step in range(3):
        plain.train_step(step)
    expected = named_params(plain.models)

    scaled = tiny_seq2seq(tmp_path)
    scaler = with_cpu_grad_scaler(scaled, 2.0**12)
    for step in range(3):
        result = scaled.train_step(step)
        assert not result.phases[0].update.skipped
    assert scaler.get_scale() == 2.0**12
    assert len(scaled.groups) == 2  # encoder and decoder optimizers share the scaler
    for name, value in named_params(scaled.models).items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=0, msg=name)


def test_overflow_skips_every_optimizer_and_is_counted(tmp_path):
    trainer = tiny_seq2seq(tmp_path)
    scaler = with_cpu_grad_scaler(trainer, 2.0**12)
    phase = trainer.recipe.phases(0)[0]
    trainer.backward_window(phase)
    before = named_params(trainer.models)
    lrs = [g.scheduler.get_last_lr() for g in trainer.groups]
    decoder_param = next(p for p in trainer.groups[1].params if p.grad is not None)
    decoder_param.grad[0] = math.inf  # one overflowing gradient in one optimizer's parameters

    update = trainer.optimizer_step(phase)

    assert update.skipped and trainer.overflow_steps == 1
    assert not math.isfinite(float(update.grad_norms["decoder"]))
    assert named_params(trainer.models).keys() == before.keys()
    for name, value in named_params(trainer.models).items():
        assert torch.equal(value, before[name]), f"{name} moved on an overflow step"
    assert [g.scheduler.get_last_lr() for g in trainer.groups] == lrs, "the schedule advanced on a skipped step"
    assert scaler.get_scale() == 2.0**11
    assert all(p.grad is None for g in trainer.groups for p in g.params), "overflowed gradients left behind"

    assert not trainer.train_step(1).phases[0].update.skipped  # training continues at the lower scale


@pytest.mark.parametrize("recipe", ["seq2seq", "classifier", "gan", "gan_r1"])
def test_clip_thresholds_bite_in_the_equivalence_cases(tmp_path, recipe):
    """The matrices check clipping (at the boundary, per optimizer) only if the thresholds are reached."""
    trainer = Trainer(case_config(recipe, "short", 1, 3, str(tmp_path)))
    clips = {g.name: g.clip_grad_norm for g in trainer.groups}
    for step in range(3):
        for phase in trainer.train_step(step).phases:
            for name, norm in phase.update.grad_norms.items():
                assert float(norm) > clips[name] > 0, (step, name, float(norm))


def test_bf16_autocast_trains(tmp_path):
    trainer = tiny_seq2seq(tmp_path, "mixed_precision=bf16")
    losses = []
    for step in range(4):
        window = trainer.train_step(step).phases[0].window
        losses.append(float(window.loss_sums.sum() / window.counts.sum()))
    assert all(math.isfinite(x) for x in losses)
    assert trainer.accelerator.mixed_precision == "bf16"


def test_schedules():
    o = OptimizerConfig(warmup_steps=4, schedule="cosine", min_lr_ratio=0.1)
    assert [schedule_factor(s, 20, o) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert schedule_factor(4, 20, o) == 1.0 and schedule_factor(20, 20, o) == pytest.approx(0.1)
    o = OptimizerConfig(schedule="linear")
    assert [schedule_factor(s, 4, o) for s in range(5)] == [1.0, 0.75, 0.5, 0.25, 0.0]
    assert schedule_factor(3, 4, OptimizerConfig(schedule="constant")) == 1.0


def test_learning_rates_are_scaled_from_the_reference_batch(tmp_path):
    cfg = resolve_config(
        [
            "recipe=classifier",
            "global_batch_size=256",
            "micro_batch_size=128",
            "reference_batch_size=64",
            "lr_scaling=sqrt",
            "classifier.optimizer.lr=0.01",
            f"output_dir={tmp_path}",
            "steps=2",
        ],
        world_size=1,
    )
    trainer = Trainer(cfg)
    assert trainer.groups[0].optimizer.param_groups[0]["lr"] == pytest.approx(0.02)
