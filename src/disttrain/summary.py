"""The lines a run prints about itself: what it is about to do, and what it did."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

from torch import nn

from disttrain.accumulation import OptimizerGroup
from disttrain.config import Config, lr_multiplier
from disttrain.metrics import FINAL_STEPS, format_losses


def startup_line(
    cfg: Config, world_size: int, accumulation: int, groups: Sequence[OptimizerGroup], epochs: float, run_dir: str
) -> str:
    scale = lr_multiplier(cfg)
    lrs = ", ".join(f"{g.name} {g.scheduler.base_lrs[0]:.3g}" for g in groups)
    scaling = (
        f" ({cfg.lr_scaling} scaling x{scale:.3g} from reference batch {cfg.reference_batch_size})"
        if scale != 1
        else ""
    )
    return (
        f"{cfg.recipe}: {world_size} process(es) x micro-batch {cfg.micro_batch_size} x accumulation "
        f"{accumulation} = global batch {cfg.global_batch_size}; {cfg.steps} steps ({epochs:.2f} epochs); "
        f"peak lr {lrs}{scaling}; run directory {run_dir}"
    )


def final_line(
    steps_run: int,
    seconds: float,
    resumed_at: int | None,
    losses: dict[str, float],
    quality: str,
    overflow_steps: int,
    nonfinite_steps: int,
    data_wait_share: float,
    where: str,
) -> str:
    last = min(steps_run, FINAL_STEPS)
    return (
        f"done: {steps_run} steps in {seconds:.1f}s ({steps_run / max(seconds, 1e-9):.2f} steps/s)"
        + (f" after resuming at step {resumed_at}" if resumed_at is not None else "")
        + (f", final {format_losses(losses)} (mean over all items of the last {last} steps)" if losses else "")
        + (f", {quality}" if quality else "")
        + f", {data_wait_share:.1%} of the time waiting for data"
        + (f", {overflow_steps} steps skipped on fp16 overflow" if overflow_steps else "")
        + (f", {nonfinite_steps} updates skipped on non-finite gradients" if nonfinite_steps else "")
        + f"; {where}"
    )


def warn_batchnorm(models: dict[str, nn.Module], cfg: Config, world_size: int, accumulation: int) -> None:
    """BatchNorm's statistics come from micro-batches: the update then differs from the whole-batch one."""
    if accumulation == 1 and (world_size == 1 or cfg.sync_batchnorm):
        return
    for name, model in models.items():
        if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
            warnings.warn(
                f"model '{name}' has BatchNorm: its statistics come from micro-batches of "
                f"{cfg.micro_batch_size} samples, not the global batch of {cfg.global_batch_size}, so "
                "the update differs from the whole-batch one. Consider sync_batchnorm=true (GPUs), a lower "
                "BatchNorm momentum, or GroupNorm/LayerNorm.",
                stacklevel=3,
            )
