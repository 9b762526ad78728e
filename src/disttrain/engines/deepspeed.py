"""DeepSpeed ZeRO 1, 2 and 3: one DeepSpeed engine per model, built here, not by Accelerate.

Accelerate only runs the process group: its own DeepSpeed mode would take over backward and step,
divide by its own accumulation count and refuse a second model. DeepSpeed's accumulation is off
(`gradient_accumulation_steps: 1`); the boundary is forced on each window's last backward and the
losses are scaled by the accumulation core, so the update is exact, shorter windows included.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from disttrain.accumulation import OptimizerGroup, UpdateResult, WindowResult
from disttrain.config import Config, ConfigError, processes
from disttrain.deepspeed_config import engine_config, load_user_config
from disttrain.engines.base import Engine, build_accelerator
from disttrain.engines.process_group import set_for_one_process
from disttrain.optim import same_class_optimizer
from disttrain.safe_files import CheckpointError

STATE_DIR = "deepspeed"  # in a checkpoint: one folder per model, each engine's own (partitioned) files


class DeepSpeedEngine(Engine):
    name = "deepspeed"

    def __init__(self, cfg: Config, find_unused_parameters: bool = False):
        # DeepSpeed casts itself (bf16, fp16): Accelerate stays in full precision.
        os.environ.pop("ACCELERATE_USE_DEEPSPEED", None)
        super().__init__(cfg, build_accelerator(cfg, "no", find_unused_parameters))
        self.engine_groups: dict[str, OptimizerGroup] = {}

    def wrap(self, models: dict[str, nn.Module], groups: list[OptimizerGroup]) -> None:
        """One engine per model; the optimizer groups of a model become parameter groups of its one
        optimizer (each keeping its learning rate, weight decay and schedule)."""
        user = load_user_config(self.cfg.deepspeed_config)
        import deepspeed

        _skip_inference_op_build()
        if not torch.distributed.is_initialized():
            self._init_one_process(deepspeed)
        # Which optimizer groups belong to which model, decided before any engine exists: ZeRO 3
        # replaces the tensors in an optimizer's groups when it builds that model's engine.
        owned = {
            name: [g for g in groups if {id(p) for p in g.params} <= {id(p) for p in model.parameters()}]
            for name, model in models.items()
        }
        for name, model in models.items():
            own = owned[name]
            optimizer = _one_optimizer(name, own)
            schedule = [fn for g in own for fn in g.scheduler.lr_lambdas]
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
            config = engine_config(user, self.cfg, self.world_size, own[0].clip_grad_norm)
            self.models[name], *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
            self.engine_groups[name] = OptimizerGroup(name, optimizer, scheduler, own[0].clip_grad_norm)
        self.groups = list(self.engine_groups.values())

    def _init_one_process(self, deepspeed: Any) -> None:
        """One plain process: DeepSpeed would look for MPI without launcher variables."""
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = str(s.getsockname()[1])
        set_for_one_process(
            {
                "MASTER_PORT": port,
                "MASTER_ADDR": "127.0.0.1",
                "RANK": "0",
                "LOCAL_RANK": "0",
                "WORLD_SIZE": "1",
                "LOCAL_WORLD_SIZE": "1",
            }
        )
        deepspeed.init_distributed(
            dist_backend="nccl" if torch.cuda.is_available() else "gloo",
            auto_mpi_discovery=False,
            rank=0,
            world_size=1,
            timeout=datetime.timedelta(seconds=self.cfg.collective_timeout_s),
        )

    def sync_context(self, models: Sequence[nn.Module], sync: bool) -> contextlib.AbstractContextManager:
        if len(models) != 1:
            raise RuntimeError(f"under DeepSpeed a window trains one model, not {len(models)}")
        # The engine reduces (ZeRO 1) or steps only at a boundary it is told of; its own count of
        # micro-steps is switched off (gradient_accumulation_steps 1).
        models[0].set_gradient_accumulation_boundary(sync)
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor, models: Sequence[nn.Module]) -> None:
        models[0].backward(loss, scale_wrt_gas=False)

    def update(
        self, names: Sequence[str], groups: Sequence[OptimizerGroup], window: WindowResult | None
    ) -> UpdateResult:
        """Each engine unscales, clips (one global norm), steps and zeroes; the schedules step here."""
        # Engines keep the reduced gradients to themselves (partitioned), so the window's losses
        # decide; a NaN/inf reaches every gradient it touches. Skipping is refused at config time.
        if window is not None and self.any_process(~torch.isfinite(window.loss_sums).all()):
            return UpdateResult(grad_norms={}, skipped=False, nonfinite=True)
        engines = [self.models[n] for n in names]
        own = [self.engine_groups[n] for n in names]
        skipped_before = [e.skipped_steps for e in engines]
        for engine in engines:
            engine.step()
        skipped = any(e.skipped_steps != s for e, s in zip(engines, skipped_before, strict=True))
        if not skipped:
            for g in own:
                g.scheduler.step()
        norms = {
            g.name: torch.as_tensor(float(e.get_global_grad_norm() or 0.0)) for g, e in zip(own, engines, strict=True)
        }
        return UpdateResult(grad_norms=norms, skipped=skipped)

    def precision(self) -> contextlib.AbstractContextManager:
        """DeepSpeed's bf16 casts the model's weights but not its float inputs: autocast matches them
        (Accelerate does the same for its own bf16 models)."""
        if self.cfg.mixed_precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def save_state(self, directory: str) -> dict[str, str]:
        for name, engine in self.models.items():
            engine.save_checkpoint(os.path.join(directory, STATE_DIR, name), tag="state", save_latest=False)
        return {}  # DeepSpeed writes its files itself: they are checksummed after

    def load_state(self, directory: str) -> None:
        for name, engine in self.models.items():
            _load_engine_files_safely(engine)
            try:
                load_dir, _ = engine.load_checkpoint(
                    os.path.join(directory, STATE_DIR, name), tag="state", load_lr_scheduler_states=False
                )
            except Exception as e:
                raise CheckpointError(f"checkpoint {directory}: DeepSpeed could not load '{name}' ({e})") from e
            if load_dir is None:
                raise CheckpointError(f"checkpoint {directory}: DeepSpeed found no state for '{name}'")

    def restores_weights(self, name: str) -> bool:
        return name in self.models  # its engine restores it, partitions and all

    def check_resumable(self, saved_world_size: int, path: str) -> None:
        if saved_world_size != self.world_size:
            raise CheckpointError(
                f"checkpoint {path} holds DeepSpeed partitions of {processes(saved_world_size)}, this run has "
                f"{self.world_size}; resume on {processes(saved_world_size)}"
            )

    def full_weights(self, module: nn.Module) -> contextlib.AbstractContextManager:
        return gathered(module)

    def evaluation_share(self, models: dict[str, nn.Module]) -> tuple[int, int]:
        # ZeRO 3 modules keep their gathering hooks even with whole weights, and those hooks must be
        # called alike on every process: there, each process scores all of the held-out data.
        partitioned = any(hasattr(p, "ds_id") for m in models.values() for p in m.parameters())
        return (0, 1) if partitioned else (self.rank, self.world_size)


def gathered(module: nn.Module) -> contextlib.AbstractContextManager:
    """Full parameters of a module inside the block when ZeRO 3 partitions them (a collective)."""
    params = [p for p in module.parameters() if hasattr(p, "ds_id")]
    if not params:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def _one_optimizer(model: str, groups: list[OptimizerGroup]) -> torch.optim.Optimizer:
    """The optimizer groups of one model as parameter groups of one optimizer of their class, built
    with the first one's settings: its `defaults` that the constructor takes (each parameter group
    keeps its own settings anyway)."""
    first = groups[0].optimizer
    param_groups = [pg for g in groups for pg in g.optimizer.param_groups]
    try:
        return same_class_optimizer(first, param_groups)
    except TypeError as e:
        raise ConfigError(
            f"DeepSpeed runs one optimizer per model, and {type(first).__name__} for '{model}' cannot be rebuilt "
            f"from its defaults ({e}); give the class defaults that match its constructor, or use DDP"
        ) from e


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


def _load_engine_files_safely(engine: Any) -> None:
    """DeepSpeed reads its checkpoint files with `torch.load(weights_only=False)`, which runs any
    pickled code; this engine reads them with `weights_only=True`, allowing only the few DeepSpeed
    types its files hold besides tensors and plain containers."""
    allowed = _deepspeed_safe_globals()

    def load(path: str, map_location: Any = None) -> Any:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location=map_location, weights_only=True)

    engine.checkpoint_engine.load = load


def _deepspeed_safe_globals() -> list[Any]:
    """The non-tensor types DeepSpeed's optimizer files hold (found with
    `torch.serialization.get_unsafe_globals_in_checkpoint` on ZeRO 1, 2 and 3 checkpoints)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]
