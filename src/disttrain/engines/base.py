"""What an engine is: the one object that knows how models are wrapped, synchronised and stepped.

The accumulation core and the trainer call this interface and never ask which engine runs. An
engine owns: wrapping models and optimizers, the sync context of a micro-step, backward, the
boundary update (unscale, clip, step, zero), its part of a checkpoint, and full weights for export.
Every engine runs its processes through an Accelerator (process group, device, reductions, trackers).
"""

from __future__ import annotations

import contextlib
import datetime
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import (
    DistributedDataParallelKwargs,
    GradientAccumulationPlugin,
    InitProcessGroupKwargs,
    broadcast_object_list,
    gather_object,
)
from torch import nn

from disttrain.accumulation import OptimizerGroup, UpdateResult, WindowResult
from disttrain.config import Config
from disttrain.engines.process_group import join_restarted_group
from disttrain.tracking import accelerator_kwargs


def build_accelerator(cfg: Config, mixed_precision: str, find_unused_parameters: bool) -> Accelerator:
    """DDP over NCCL on GPUs, over gloo on CPUs; accumulation and scheduling stay ours.

    Accelerate's own accumulation divides by a fixed count and its prepared schedulers step once
    per process: both would make the update depend on the world size, so neither is used.
    """
    join_restarted_group(cfg.collective_timeout_s)
    return Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision=mixed_precision,
        gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=1),
        step_scheduler_with_optimizer=False,
        kwargs_handlers=[
            DistributedDataParallelKwargs(find_unused_parameters=find_unused_parameters),
            # A dead or hung process then ends the run with an error instead of a silent wait.
            InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=cfg.collective_timeout_s)),
        ],
        **accelerator_kwargs(cfg),
    )


class Engine(ABC):
    """Process facts come from the Accelerator; everything that differs is an abstract method."""

    name: str
    #: module classes a sharding engine makes units of their own (the recipe's `shard_blocks`)
    block_classes: tuple[type[nn.Module], ...] = ()

    def __init__(self, cfg: Config, accelerator: Accelerator):
        self.cfg = cfg
        self.accelerator = accelerator
        self.models: dict[str, nn.Module] = {}  # as wrapped: what forward and backward go through
        self.groups: list[OptimizerGroup] = []  # as stepped: one per optimizer the engine runs

    # ------------------------------------------------------------------ processes

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def world_size(self) -> int:
        return self.accelerator.num_processes

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def is_main_process(self) -> bool:
        return self.accelerator.is_main_process

    def reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.accelerator.reduce(tensor, reduction="sum")

    def any_process(self, flag: torch.Tensor) -> bool:
        """Whether `flag` is true on any process (a collective)."""
        return bool(self.reduce_sum(flag.float().reshape(1).to(self.device)) > 0)

    def wait_for_everyone(self) -> None:
        self.accelerator.wait_for_everyone()

    def share_from_main(self, value: Any) -> Any:
        """The main process's `value`, on every process (a collective)."""
        if self.world_size == 1:
            return value
        box = [value]
        broadcast_object_list(box, from_process=0)
        return box[0]

    def gather_objects(self, value: Any) -> list[Any]:
        """Every process's `value`, in rank order, on every process (a collective)."""
        return gather_object([value]) if self.world_size > 1 else [value]

    # ------------------------------------------------------------------ what differs

    @abstractmethod
    def wrap(self, models: dict[str, nn.Module], groups: list[OptimizerGroup]) -> None:
        """Wrap the recipe's models and optimizers; sets `models` and `groups`."""

    @abstractmethod
    def sync_context(self, models: Sequence[nn.Module], sync: bool) -> contextlib.AbstractContextManager:
        """The context of one forward and backward: gradients cross processes only when `sync`."""

    @abstractmethod
    def backward(self, loss: torch.Tensor, models: Sequence[nn.Module]) -> None:
        """Backpropagate an already scaled loss of `models` (the trained models of the window)."""

    @abstractmethod
    def update(
        self, names: Sequence[str], groups: Sequence[OptimizerGroup], window: WindowResult | None
    ) -> UpdateResult:
        """At the window's boundary: unscale, clip each group, step optimizers and schedules, zero.

        `names` are the models the window trained, `groups` the recipe's optimizer groups for them,
        `window` its result (None when the caller has none: the losses then decide nothing).
        """

    def precision(self) -> contextlib.AbstractContextManager:
        """Around forward passes: casts the engine does not do itself."""
        return contextlib.nullcontext()

    # ------------------------------------------------------------------ checkpoints and export

    @abstractmethod
    def save_state(self, directory: str) -> dict[str, str]:
        """Write the engine's part of a checkpoint (optimizer states...); every process calls it.
        Returns the sha256 of the files it checksummed while writing them (path -> digest)."""

    def save_state_later(self, directory: str, group: Any) -> Callable[[], dict[str, str]]:
        """Copy the engine's part of a checkpoint to host memory now; the function returned writes it
        (as `save_state` does) from another thread while training goes on, with collectives only over
        `group` (None: one process). Engines that cannot write outside the step do not override it."""
        raise NotImplementedError(f"the {self.name} engine cannot write checkpoints in the background")

    @abstractmethod
    def load_state(self, directory: str) -> None:
        """Restore what `save_state` wrote; raises CheckpointError with the reason."""

    def restores_weights(self, name: str) -> bool:
        """Whether `load_state` restores model `name`'s weights itself (else they load from safetensors)."""
        return False

    def check_resumable(self, saved_world_size: int, path: str) -> None:
        """Refuse a checkpoint of another process count that this engine cannot re-shard. Engines
        that keep full state on every process resume on any count."""
        return None

    def full_weights(self, module: nn.Module) -> contextlib.AbstractContextManager:
        """Inside the block, `module`'s parameters are whole on every process (a collective)."""
        return contextlib.nullcontext()

    def full_weights_later(self, module: nn.Module, group: Any) -> Callable[[], dict[str, torch.Tensor]] | None:
        """For a background checkpoint: copy what this process holds of `module` now and return the
        function that makes its full state from the copies, on the main process, over `group`
        (every process calls it); None where the weights are best gathered in the step (whole on
        every process already, or no cheaper way)."""
        return None

    def input_gradient_forward(self, module: nn.Module) -> Callable[..., Any]:
        """`module`'s forward for a loss on the gradient of its output with respect to its input (R1,
        a gradient penalty): a second backward runs through that gradient. The module itself, where
        its wrapper keeps whole weights through such a pass."""
        return module

    def evaluation_share(self, models: dict[str, nn.Module]) -> tuple[int, int]:
        """(index, count) of this process's share of held-out data: 1 of 1 means every process
        scores all of it, and the results are not summed over processes."""
        return self.rank, self.world_size

    def release(self, meet: bool = True) -> None:
        """Meet every process (not after a failure) and release the process group (see
        process_group.release_process_group)."""
        from disttrain.engines.process_group import release_process_group

        release_process_group(meet)
