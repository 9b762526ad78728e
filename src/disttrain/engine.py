"""Builds the Accelerator: the only place that knows which engine runs underneath."""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
import sys

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, GradientAccumulationPlugin, InitProcessGroupKwargs
from torch import nn

from disttrain.accumulation import OptimizerGroup
from disttrain.config import Config, ConfigError
from disttrain.deepspeed_config import engine_config, load_user_config
from disttrain.tracking import accelerator_kwargs


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
    if cfg.deepspeed:  # resolved by the trainer from `deepspeed=` or the launcher's variables
        # DeepSpeed engines are built by us (one per model); Accelerate only runs the process group.
        # Its own DeepSpeed mode would take over backward and step, divide by its count, and
        # refuse a second model.
        os.environ.pop("ACCELERATE_USE_DEEPSPEED", None)
    return Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision="no" if cfg.deepspeed else cfg.mixed_precision,  # DeepSpeed casts itself
        gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=1),
        step_scheduler_with_optimizer=False,
        kwargs_handlers=[
            DistributedDataParallelKwargs(find_unused_parameters=find_unused_parameters),
            # A dead or hung process then ends the run with an error instead of a silent wait.
            InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=cfg.collective_timeout_s)),
        ],
        **accelerator_kwargs(cfg),
    )


# Environment variables build_deepspeed_engines set for a one-process run (see release_process_group).
_SET_FOR_ONE_PROCESS: list[str] = []


def build_deepspeed_engines(
    cfg: Config, models: dict[str, nn.Module], groups: list[OptimizerGroup], world_size: int
) -> tuple[dict[str, nn.Module], dict[str, OptimizerGroup]]:
    """One DeepSpeed engine per model; the optimizer groups of a model become parameter groups of
    its one optimizer (each keeping its learning rate, weight decay and schedule)."""
    user = load_user_config(cfg.deepspeed)
    import deepspeed

    _skip_inference_op_build()

    if not torch.distributed.is_initialized():  # one plain process: DeepSpeed would look for MPI
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = str(s.getsockname()[1])
        # DeepSpeed reads these (it asserts LOCAL_RANK); release_process_group takes them back, so
        # that a later run in this process (a notebook, a sweep) does not take itself for distributed.
        one_process = {
            "MASTER_PORT": port,
            "MASTER_ADDR": "127.0.0.1",
            "RANK": "0",
            "LOCAL_RANK": "0",
            "WORLD_SIZE": "1",
            "LOCAL_WORLD_SIZE": "1",
        }
        for key, value in one_process.items():
            if key not in os.environ:
                os.environ[key] = value
                _SET_FOR_ONE_PROCESS.append(key)
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        deepspeed.init_distributed(
            dist_backend=backend,
            auto_mpi_discovery=False,
            rank=0,
            world_size=1,
            timeout=datetime.timedelta(seconds=cfg.collective_timeout_s),
        )
    # Which optimizer groups belong to which model, decided before any engine exists: ZeRO 3
    # replaces the tensors in an optimizer's groups when it builds that model's engine.
    owned = {
        name: [g for g in groups if {id(p) for p in g.params} <= {id(p) for p in model.parameters()}]
        for name, model in models.items()
    }
    engines, merged = {}, {}
    for name, model in models.items():
        own = owned[name]
        optimizer = type(own[0].optimizer)([pg for g in own for pg in g.optimizer.param_groups])
        schedule = [fn for g in own for fn in g.scheduler.lr_lambdas]
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        config = engine_config(user, cfg, world_size, own[0].clip_grad_norm)
        engines[name], *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
        merged[name] = OptimizerGroup(name, optimizer, scheduler, own[0].clip_grad_norm)
    return engines, merged


def _skip_inference_op_build() -> None:
    """Keep DeepSpeed from compiling its shared-memory op on CPU machines (40-80 s on first start).

    That op serves only `inference_all_reduce` (tensor-parallel inference); training's collectives
    go through torch.distributed either way. DeepSpeed builds it only for ops it lists as
    compatible, so it is listed as not compatible.
    """
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    compatible = getattr(deepspeed.ops, "__compatible_ops__", None)
    if builder is not None and isinstance(compatible, dict):
        compatible[builder.NAME] = False


def gathered(module: nn.Module) -> contextlib.AbstractContextManager:
    """Full parameters of a module inside the block, also when ZeRO 3 partitions them (collective)."""
    params = [p for p in module.parameters() if hasattr(p, "ds_id")]
    if not params:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


# Works of each process's last barrier, kept until the process ends (see release_process_group).
_LAST_BARRIERS: list = []


def release_process_group() -> None:
    """Meet every rank, then destroy the default process group, without gloo's exit deadlock.

    ProcessGroupGloo's destructor (run when the last holder, e.g. a DDP wrapper, is freed, with the
    GIL held) joins gloo's worker threads. A worker that is still dropping the last reference to a
    finished collective frees tensors owned by Python and waits for the GIL: the process never
    exits. Seen as a hang after "done:" in about 1 of 50 launches under load. Keeping the last
    barrier's work alive means no worker drops a last reference; every earlier work is held by it.
    docs/gloo-exit-hang.md has the stacks and the check.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    work = torch.distributed.barrier(async_op=True)
    work.wait()
    _LAST_BARRIERS.append(work)
    deepspeed_comm = sys.modules.get("deepspeed.comm")
    if deepspeed_comm is not None and deepspeed_comm.is_initialized():
        # DeepSpeed's own teardown also forgets the groups it cached, which a later run in this
        # process (a sweep, a notebook) would otherwise use after they are gone.
        deepspeed_comm.destroy_process_group()
    else:
        torch.distributed.destroy_process_group()
    while _SET_FOR_ONE_PROCESS:
        os.environ.pop(_SET_FOR_ONE_PROCESS.pop(), None)
