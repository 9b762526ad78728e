"""DDP through Accelerate (one process included): the default engine.

Optimizers are torch's; fp16 loss scaling is Accelerate's scaler, driven here so that several
optimizers share one skip decision. Every process holds full weights and full optimizer state.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from disttrain.accumulation import OptimizerGroup, UpdateResult, WindowResult
from disttrain.config import Config
from disttrain.engines.base import Engine, build_accelerator
from disttrain.safe_files import CheckpointError, copied_for_later, safe_load, save_torch, torch_bytes, write_bytes

OPTIMIZERS_FILE = "optimizers.pt"


def unwrap_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    return getattr(optimizer, "optimizer", optimizer)  # AcceleratedOptimizer keeps the torch one here


class DDPEngine(Engine):
    name = "ddp"

    def __init__(self, cfg: Config, find_unused_parameters: bool = False):
        super().__init__(cfg, build_accelerator(cfg, cfg.mixed_precision, find_unused_parameters))

    def wrap(self, models: dict[str, nn.Module], groups: list[OptimizerGroup]) -> None:
        self.models = {name: self.accelerator.prepare_model(m) for name, m in models.items()}
        for group in groups:
            group.optimizer = self.accelerator.prepare_optimizer(group.optimizer)
        self.groups = groups

    def sync_context(self, models: Sequence[nn.Module], sync: bool) -> contextlib.AbstractContextManager:
        """`no_sync` for every model unless this pass must synchronise.

        Accelerate's `no_sync` is a no-op for a single process even when it wrapped the model in DDP
        (a distributed launch with one process): then a second loss term of a micro-step would start
        a new DDP iteration before the first one reduced. A DDP model therefore gets its own `no_sync`.
        """
        stack = contextlib.ExitStack()
        if not sync:
            for model in models:
                ddp = isinstance(model, nn.parallel.DistributedDataParallel)
                stack.enter_context(model.no_sync() if ddp else self.accelerator.no_sync(model))
        return stack

    def backward(self, loss: torch.Tensor, models: Sequence[nn.Module]) -> None:
        if self.accelerator.scaler is None:
            loss.backward()  # Accelerate's backward would only divide by an accumulation count of 1
        else:
            self.accelerator.backward(loss)

    def update(
        self, names: Sequence[str], groups: Sequence[OptimizerGroup], window: WindowResult | None
    ) -> UpdateResult:
        scaler = self.accelerator.scaler
        if scaler is not None:
            for g in groups:
                scaler.unscale_(unwrap_optimizer(g.optimizer))
        norms = {
            g.name: nn.utils.clip_grad_norm_(g.params, g.clip_grad_norm if g.clip_grad_norm > 0 else math.inf)
            for g in groups
        }
        skipped = nonfinite = False
        if scaler is not None:
            # One decision for all optimizers: torch's scaler decides per optimizer, which would move
            # one model of a pair and not the other. Accelerate's optimizer wrapper also calls
            # scaler.update() after each optimizer, which unscales the next one a second time.
            skipped = not all(bool(torch.isfinite(n)) for n in norms.values())
            if not skipped:
                for g in groups:
                    scaler.step(unwrap_optimizer(g.optimizer))
            scaler.update()
        else:
            # After the all-reduce every process holds the same gradients, so this local check is the
            # same decision everywhere, with no communication.
            nonfinite = not all(bool(torch.isfinite(n)) for n in norms.values())
            if not nonfinite:
                for g in groups:
                    g.optimizer.step()
        if not (skipped or nonfinite):
            for g in groups:
                g.scheduler.step()
        for name in names:
            self.models[name].zero_grad(set_to_none=True)
        return UpdateResult(grad_norms=norms, skipped=skipped, nonfinite=nonfinite)

    def save_state(self, directory: str) -> dict[str, str]:
        if not self.is_main_process:  # identical on every process
            return {}
        states = {g.name: unwrap_optimizer(g.optimizer).state_dict() for g in self.groups}
        path = os.path.join(directory, OPTIMIZERS_FILE)
        return {path: save_torch(states, path)}

    def save_state_later(self, directory: str, group: Any) -> Callable[[], dict[str, str]]:
        if not self.is_main_process:
            return dict
        path = os.path.join(directory, OPTIMIZERS_FILE)
        states = copied_for_later(
            {g.name: unwrap_optimizer(g.optimizer).state_dict() for g in self.groups}, torch_bytes
        )
        return lambda: {path: write_bytes(path, states())}

    def load_state(self, directory: str) -> None:
        states = safe_load(os.path.join(directory, OPTIMIZERS_FILE), directory)
        for g in self.groups:
            if g.name not in states:
                raise CheckpointError(f"checkpoint {directory}: no optimizer state for '{g.name}'")
            unwrap_optimizer(g.optimizer).load_state_dict(states[g.name])
