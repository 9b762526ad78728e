"""Builds the Accelerator: the only place that knows which engine runs underneath."""

from __future__ import annotations

import os

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, GradientAccumulationPlugin

from disttrain.config import Config, ConfigError


def check_launcher_env(cfg: Config) -> None:
    """Refuse launcher settings that would silently override this run's config.

    `accelerate launch` exports its config file's values, and Accelerate reads them over the
    arguments it is given: a second source for settings that decide the update.
    """
    launcher_precision = os.environ.get("ACCELERATE_MIXED_PRECISION", cfg.mixed_precision)
    if launcher_precision != cfg.mixed_precision:
        raise ConfigError(
            f"mixed_precision={cfg.mixed_precision} but the accelerate launch config says "
            f"mixed_precision: {launcher_precision}; set it once, in the run config (mixed_precision=...), "
            "and remove it from the accelerate config"
        )
    launcher_accumulation = os.environ.get("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "1")
    if launcher_accumulation != "1":
        raise ConfigError(
            f"the accelerate launch config sets gradient_accumulation_steps: {launcher_accumulation}; "
            "remove it: accumulation follows from global_batch_size / (micro_batch_size x processes)"
        )


def check_device_support(cfg: Config, world_size: int) -> None:
    if cfg.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError("mixed_precision=fp16 needs a GPU (CPU has no fp16 loss scaling); use bf16 on CPU")
    if cfg.sync_batchnorm and world_size > 1 and not torch.cuda.is_available():
        raise ConfigError("sync_batchnorm=true needs GPUs (torch's SyncBatchNorm does not run on CPU); set it to false")


def build_accelerator(cfg: Config, find_unused_parameters: bool = False) -> Accelerator:
    """DDP over NCCL on GPUs, over gloo on CPUs; accumulation and scheduling stay ours.

    Accelerate's own accumulation divides by a fixed count and its prepared schedulers step once
    per process: both would make the update depend on the world size, so neither is used.
    """
    return Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=1),
        step_scheduler_with_optimizer=False,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=find_unused_parameters)],
    )
