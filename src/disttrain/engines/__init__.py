"""Engines: DDP (one process included), DeepSpeed and FSDP2, behind one interface (engines/base.py).

Adding an engine is one file with an `Engine` subclass and one line in `build_engine`.
"""

from __future__ import annotations

from disttrain.config import Config
from disttrain.engines.base import Engine


def build_engine(cfg: Config, find_unused_parameters: bool = False) -> Engine:
    """The engine the run config asks for; it starts the process group (through Accelerate)."""
    if cfg.deepspeed_config:
        from disttrain.engines.deepspeed import DeepSpeedEngine

        return DeepSpeedEngine(cfg, find_unused_parameters)
    if cfg.fsdp.enabled:
        from disttrain.engines.fsdp import FSDPEngine

        return FSDPEngine(cfg)
    from disttrain.engines.ddp import DDPEngine

    return DDPEngine(cfg, find_unused_parameters)
