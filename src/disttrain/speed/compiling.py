"""`compile=true`: each model's forward compiled with torch.compile, in place.

The forward is replaced on the module itself, after the engine wrapped it: DDP's and DeepSpeed's
wrappers call it as their inner module's forward, FSDP2's hooks (gather, reshard, reduce) stay
outside it on the module's `__call__`. The module keeps its class, its parameter names and its
state dict, so checkpoints, weights and the engines' sync contexts are those of an eager run: DDP's
`no_sync` and its reducer run eagerly around the compiled forward and backward, and still reduce
once per window.

Why not `nn.Module.compile()`: on torch 2.13 it compiles `Module._call_impl`, a frame Dynamo skips
(torch.nn is on its skip list), so nothing is compiled and nothing says so. The forward is reached
here through a function of this module, which Dynamo traces and inlines the forward into.
"""

from __future__ import annotations

import time
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from disttrain.config import Config

DYNAMIC = {"auto": None, "true": True, "false": False}  # compile_dynamic -> torch.compile(dynamic=...)


def compile_models(models: dict[str, nn.Module], cfg: Config) -> None:
    """Compile the forward of every model in place (see the module's docstring)."""
    for name, model in models.items():
        model.forward = _compiled(name, model.forward, cfg)


def _compiled(name: str, forward: Callable[..., Any], cfg: Config) -> Callable[..., Any]:
    def call(*args: Any, **kwargs: Any) -> Any:
        return forward(*args, **kwargs)

    # Dynamo keeps its compiled graphs, and its limit of recompilations (8), per code object: each
    # model gets its own, so that models do not share the limit (and logs name the model).
    code = call.__code__.replace(co_name=f"compiled_{name}")
    call = types.FunctionType(code, call.__globals__, code.co_name, call.__defaults__, call.__closure__)
    # Only the inductor backend takes a mode; `default` means no mode for any backend.
    mode = {"mode": cfg.compile_mode} if cfg.compile_mode != "default" else {}
    return torch.compile(call, backend=cfg.compile_backend, dynamic=DYNAMIC[cfg.compile_dynamic], **mode)


def compiled_graphs() -> int:
    """Graphs Dynamo has compiled in this process so far: first compilations, graph breaks and
    recompilations (a new shape, a new mode) alike."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def compile_seconds() -> float:
    """Seconds this process has spent compiling so far (tracing and the backend's compilation)."""
    from torch._dynamo.utils import compilation_time_metrics

    return float(sum(compilation_time_metrics.get("_compile.compile_inner", [])))


@dataclass
class Compilation:
    """What compiling cost between `start()` and `stop()`: graphs and seconds, on this process."""

    graphs: int = 0
    seconds: float = 0.0
    wall_seconds: float = 0.0

    def start(self) -> Compilation:
        self._graphs, self._seconds, self._wall = compiled_graphs(), compile_seconds(), time.perf_counter()
        return self

    def stop(self) -> Compilation:
        self.graphs = compiled_graphs() - self._graphs
        self.seconds = compile_seconds() - self._seconds
        self.wall_seconds = time.perf_counter() - self._wall
        return self
