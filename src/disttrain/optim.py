"""Optimizers and learning-rate schedules from an OptimizerConfig."""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Iterable

import torch
from torch import nn

from disttrain.accumulation import OptimizerGroup
from disttrain.config import ConfigError, OptimizerConfig


def schedule_factor(step: int, total_steps: int, o: OptimizerConfig) -> float:
    """Multiplier of the peak learning rate after `step` optimizer steps."""
    if step < o.warmup_steps:
        return (step + 1) / o.warmup_steps
    if o.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - o.warmup_steps) / max(1, total_steps - o.warmup_steps))
    shape = 1.0 - progress if o.schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return o.min_lr_ratio + (1.0 - o.min_lr_ratio) * shape


def optimizer_class(path: str) -> type[torch.optim.Optimizer]:
    """The optimizer class a dotted path names (`torch.optim.RAdam`, `mypackage.Lion`)."""
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def check_optimizer(key: str, o: OptimizerConfig) -> None:
    """Refuse, before any process group, a class that cannot be imported or built as configured."""
    if "." in o.name:
        _check_class(key, o)
    # Built on two stand-in parameters exactly as training builds it: the class's own checks (an
    # unknown keyword, nesterov without momentum, a malformed value) speak now, in one line.
    stand_ins = [nn.Parameter(torch.zeros(2, 2)), nn.Parameter(torch.zeros(2))]
    try:
        build_group(key, stand_ins, o, total_steps=1)
    except (TypeError, ValueError, RuntimeError) as e:
        given = {k: v for k, v in vars(o).items() if v != getattr(OptimizerConfig(), k) and k != "kwargs"}
        given.update({f"kwargs.{k}": v for k, v in o.kwargs.items()})
        settings = ", ".join(f"{key}.{k}={v}" for k, v in given.items()) or f"{key} at its defaults"
        raise ConfigError(f"{settings}: the optimizer refuses them ({e}); change them") from e


def _check_class(key: str, o: OptimizerConfig) -> None:
    try:
        cls = optimizer_class(o.name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"{key}.name={o.name}: no such optimizer class ({e})") from e
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise ConfigError(f"{key}.name={o.name} is not a torch.optim.Optimizer subclass")
    signature = inspect.signature(cls)
    try:
        signature.bind([], lr=o.lr, **o.kwargs)
    except TypeError as e:
        unknown = sorted(set(o.kwargs) - set(signature.parameters))
        if unknown and not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values()):
            takes = ", ".join(n for n in signature.parameters if n != "params")
            fix = f"remove {', '.join(f'{key}.kwargs.{n}' for n in unknown)} ({o.name} takes {takes})"
        else:
            fix = f"give the missing arguments as {key}.kwargs.<name>=<value>"
        raise ConfigError(
            f"{key}.name={o.name} cannot be built with lr and {key}.kwargs={dict(o.kwargs)} ({e}); {fix}"
        ) from e
    accepts_decay = "weight_decay" in signature.parameters or any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values()
    )
    if o.weight_decay > 0 and not accepts_decay:
        raise ConfigError(f"{key}.weight_decay={o.weight_decay}: {o.name} takes no weight_decay; set it to 0")


def build_group(
    name: str,
    params: Iterable[nn.Parameter],
    o: OptimizerConfig,
    total_steps: int,
    lr_multiplier: float = 1.0,
) -> OptimizerGroup:
    """An optimizer over `params` with its schedule; weight decay spares biases and norm weights."""
    params = [p for p in params if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    # "name" survives merging into another optimizer (one per DeepSpeed engine): logs stay per group.
    param_groups = [
        {"params": decay, "weight_decay": o.weight_decay, "name": name},
        {"params": no_decay, "weight_decay": 0.0, "name": name},
    ]
    lr = o.lr * lr_multiplier
    kwargs = dict(o.kwargs)
    if o.name == "adamw":
        optimizer: torch.optim.Optimizer = torch.optim.AdamW(
            param_groups, lr=lr, **{"betas": (o.beta1, o.beta2), "foreach": True, **kwargs}
        )
    elif o.name == "sgd":
        optimizer = torch.optim.SGD(param_groups, lr=lr, **{"momentum": o.momentum, "foreach": True, **kwargs})
    else:
        optimizer = optimizer_class(o.name)(param_groups, lr=lr, **kwargs)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: schedule_factor(step, total_steps, o))
    return OptimizerGroup(name, optimizer, scheduler, o.clip_grad_norm)


def same_class_optimizer(template: torch.optim.Optimizer, param_groups: list[dict]) -> torch.optim.Optimizer:
    """An optimizer of `template`'s class over `param_groups` (each keeps its own settings), built
    with the template's `defaults` that the constructor takes: what an engine that replaces or merges
    the parameters does. Raises TypeError when the class cannot be built that way."""
    accepted = inspect.signature(type(template)).parameters
    open_ended = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())
    settings = {k: v for k, v in template.defaults.items() if open_ended or k in accepted}
    return type(template)(param_groups, **settings)
