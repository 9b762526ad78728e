"""Where a run writes: one directory per run (never per process), named on the main process."""

from __future__ import annotations

import datetime
import os

from accelerate.utils import broadcast_object_list

from disttrain.config import Config, to_yaml
from disttrain.engines.base import Engine
from disttrain.preemption import slurm_job


def run_name(cfg: Config) -> str:
    """`run_name`, else under SLURM `<recipe>-<job>` (so a requeued job finds its own checkpoints),
    else empty: the main process then picks `<recipe>-<timestamp>`."""
    if cfg.run_name:
        return cfg.run_name
    job = slurm_job()
    return f"{cfg.recipe_section}-{job}" if job else ""


def make_run_dir(cfg: Config, engine: Engine) -> str:
    """Create the run directory with the resolved config.yaml; every process gets its path."""
    name = [run_name(cfg)]
    if not name[0] and engine.is_main_process:
        stamp = f"{cfg.recipe_section}-{datetime.datetime.now():%Y%m%d-%H%M%S}"
        name[0] = next(
            f"{stamp}{suffix}"
            for suffix in ["", *(f"-{i}" for i in range(1, 1000))]
            if not os.path.exists(os.path.join(cfg.output_dir, f"{stamp}{suffix}"))
        )
    if engine.world_size > 1:
        broadcast_object_list(name, from_process=0)
    run_dir = os.path.join(cfg.output_dir, name[0])
    if engine.is_main_process:
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, "config.yaml"), "w") as f:
            f.write(to_yaml(cfg))
    engine.wait_for_everyone()
    return run_dir
