"""Startup: wall time of `python train.py --help`, and from launch to the first optimizer step with
2 processes under `accelerate launch`, DDP against DeepSpeed ZeRO 2 (settings taking turns).

The first-step child (`python -m bench.startup key=value ...`) does what train.py does (parse the
config, build the trainer) and then one `train_step`, printing when each stage ended. DeepSpeed's
shared-memory op is loaded from its cache (`TORCH_EXTENSIONS_DIR=.cache/torch_extensions`), so
its one-time compile (30 to 80 s) is not counted; the first `make test` or any DeepSpeed run builds it.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.harness import free_port, job_env, run_command, spread

LAUNCHERS = {"ddp": "configs/accelerate/ddp.yaml", "deepspeed_zero2": "configs/accelerate/deepspeed_zero2.yaml"}
RUN = ["config=configs/debug.yaml", "progress_bar=false"]
STAGES = ("config", "trainer", "first_step")
MARK = "BENCH-STARTUP"


def help_seconds(repeats: int) -> dict[str, float]:
    times = []
    with tempfile.TemporaryDirectory(prefix="disttrain-bench-") as scratch:
        for _ in range(repeats):
            start = time.perf_counter()
            run_command([sys.executable, "train.py", "--help"], job_env(scratch), timeout=120)
            times.append(time.perf_counter() - start)
    return spread(times)


def first_step_seconds(repeats: int) -> dict[str, Any]:
    """Seconds from starting `accelerate launch` to the end of each stage on rank 0, per launcher."""
    from bench.harness import quiet_args

    accelerate = str(Path(sys.executable).parent / "accelerate")
    raw: dict[str, dict[str, list[float]]] = {name: {s: [] for s in STAGES} for name in LAUNCHERS}
    with tempfile.TemporaryDirectory(prefix="disttrain-bench-") as scratch:
        for rep in range(repeats):
            for name, config in LAUNCHERS.items() if rep % 2 == 0 else reversed(LAUNCHERS.items()):
                cmd = [
                    accelerate,
                    "launch",
                    "--config_file",
                    config,
                    "--main_process_port",
                    str(free_port()),
                    "--module",
                    "bench.startup",
                    *RUN,
                    f"output_dir={scratch}/runs",
                    *quiet_args(),
                ]
                start = time.time()
                done = run_command(cmd, job_env(scratch), timeout=300)
                marks = dict(line.split()[1:] for line in done.stdout.splitlines() if line.startswith(MARK))
                for stage in STAGES:
                    raw[name][stage].append(float(marks[stage]) - start)
    return {name: {s: spread(v) for s, v in stages.items()} for name, stages in raw.items()}


def child(argv: list[str]) -> None:
    """train.py's start, one optimizer step, and the time each stage ended (Unix seconds)."""
    from disttrain.preflight import config_or_exit

    cfg = config_or_exit(argv)
    marks = {"config": time.time()}
    from disttrain.trainer import Trainer

    trainer = Trainer(cfg)
    marks["trainer"] = time.time()
    trainer.train_step(0)
    marks["first_step"] = time.time()
    if os.environ.get("RANK", "0") == "0":
        for stage, at in marks.items():
            print(f"{MARK} {stage} {at:.6f}", flush=True)
    trainer.close()


if __name__ == "__main__":
    child(sys.argv[1:])
