"""What every benchmark shares: the workloads, the template's trainer, paired timing, jobs and statistics.

A comparison runs as one job (`torchrun`, 2 CPU processes over gloo, one thread each). Inside it
the sides take turns: every repetition times each side once, in a shuffled order, on the same
optimizer steps of the same data, so that noise from other processes on the machine falls on
all sides alike and cancels in their ratio. Rank 0 writes the raw timings as JSON; the statistics
are computed by the parent (`bench/report.py`).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent

# The seq2seq shapes of the loop comparison. "1m": the 1.06 M-parameter Transformer
# (width 128, 2 encoder and 2 decoder layers; 1.07 M parameters with this vocabulary). "tiny":
# configs/debug.yaml's size (6 k parameters), where the fixed cost of a micro-step dominates.
WORKLOADS: dict[str, list[str]] = {
    "1m": [
        "seq2seq.d_model=128",
        "seq2seq.n_heads=4",
        "seq2seq.ffn_dim=640",
        "seq2seq.encoder_layers=2",
        "seq2seq.decoder_layers=2",
    ],
    "tiny": [
        "seq2seq.vocab_size=6",
        "seq2seq.max_len=6",
        "seq2seq.d_model=16",
        "seq2seq.n_heads=2",
        "seq2seq.encoder_layers=1",
        "seq2seq.decoder_layers=1",
        "seq2seq.ffn_dim=32",
    ],
}
MICRO_BATCH = {"1m": 6, "tiny": 4}
WORLD_SIZE = 2

# Later issues add keys whose defaults do work outside `train_step` (trackers, checkpoints, resume):
# switched off where the config knows them, and left out where it does not yet.
QUIET_KEYS = {"tracker": "none", "checkpoint_every": "0", "resume": "never", "save_weights": "false"}


# --------------------------------------------------------------------------- the template


def run_args(
    workload: str,
    accumulation: int,
    world_size: int,
    output_dir: str,
    micro_batch: int | None = None,
    windows: int = 256,
) -> list[str]:
    """Run-config arguments of `workload` with `accumulation` micro-batches per process and step."""
    micro = micro_batch or MICRO_BATCH[workload]
    return [
        "recipe=seq2seq",
        *WORKLOADS[workload],
        # A whole number of global batches: every window is full, as the baselines assume.
        f"seq2seq.num_train={micro * world_size * accumulation * windows}",
        "seq2seq.num_eval=64",
        f"global_batch_size={micro * world_size * accumulation}",
        f"micro_batch_size={micro}",
        "steps=100000",  # the schedule's length: learning rates stay near their peak while we measure
        f"output_dir={output_dir}",
        "progress_bar=false",
        *quiet_args(),
    ]


def quiet_args() -> list[str]:
    from disttrain.config import Config

    known = {f.name for f in dataclasses.fields(Config)}
    return [f"{k}={v}" for k, v in QUIET_KEYS.items() if k in known]


def scratch_dir() -> str:
    """The job's scratch directory, the same for all its processes (the launcher's TMPDIR)."""
    return os.environ.get("TMPDIR") or tempfile.gettempdir()


def build_trainer(args: list[str], run_name: str) -> Any:
    """The template's real trainer, built as train.py builds it (the world size from the launcher)."""
    from disttrain.config import world_size_from_env
    from disttrain.preflight import resolve_config
    from disttrain.trainer import Trainer

    cfg = resolve_config([*args, f"run_name={run_name}"], world_size=world_size_from_env())
    return Trainer(cfg)


def parameter_count(model: Any) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# --------------------------------------------------------------------------- timing inside a job


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def collective_device() -> Any:
    """Where a tensor must be for the default group's collectives: a group of NCCL alone (Accelerate's
    and DeepSpeed's on GPUs) takes no CPU tensor; gloo, and a group with a CPU backend, take them."""
    import torch
    import torch.distributed as dist

    if dist.is_initialized() and torch.cuda.is_available() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def timed(fn: Callable[[], Any]) -> tuple[float, float]:
    """Wall seconds `fn` takes on the slowest process (all start together), and CPU seconds summed
    over processes. CPU time leaves out the time a process waits: descheduled by other load on
    the machine, or blocked in a collective."""
    import torch
    import torch.distributed as dist

    barrier()
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    device = collective_device()
    wall_t = torch.tensor([wall], dtype=torch.float64, device=device)
    cpu_t = torch.tensor([cpu], dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(wall_t, op=dist.ReduceOp.MAX)
        dist.all_reduce(cpu_t)
    return float(wall_t), float(cpu_t)


def shuffled(sides: Sequence[str], rep: int) -> list[str]:
    """The order of the sides in repetition `rep`: seeded by `rep` (the same on every process), so
    that no side always follows the same other one or holds the same place."""
    return random.Random(rep).sample(list(sides), len(sides))


def interleave(
    sides: dict[str, Callable[[range], Any]], reps: int, steps_per_rep: int, warmup: int, first_step: int = 0
) -> dict[str, dict[str, list[float]]]:
    """Wall and CPU seconds per block of `steps_per_rep` optimizer steps, per side and repetition:
    `{"seconds": {side: [...]}, "cpu_seconds": {side: [...]}}`.

    Every side runs the same optimizer steps (so the same data) in a repetition; `warmup` steps
    first, untimed, build the optimizer states and warm the allocator.
    """
    for run in sides.values():
        run(range(first_step, first_step + warmup))
    out: dict[str, dict[str, list[float]]] = {"seconds": {n: [] for n in sides}, "cpu_seconds": {n: [] for n in sides}}
    for rep in range(reps):
        start = first_step + warmup + rep * steps_per_rep
        block = range(start, start + steps_per_rep)
        for name in shuffled(list(sides), rep):
            wall, cpu = timed(lambda run=sides[name], block=block: run(block))
            out["seconds"][name].append(wall)
            out["cpu_seconds"][name].append(cpu)
    return out


def job_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", required=True, help="JSON file rank 0 writes the raw results to")
    parser.add_argument("--reps", type=int, default=15, help="interleaved repetitions")
    parser.add_argument("--quick", action="store_true", help="small blocks, for development")
    return parser


def write_result(path: str, result: dict) -> None:
    if rank() == 0:
        with open(path + ".tmp", "w") as f:
            json.dump(result, f, indent=1)
        os.replace(path + ".tmp", path)


def finish() -> None:
    """Free everything, meet, then destroy the group: gloo may abort at exit otherwise."""
    from disttrain.engines.process_group import release_process_group

    gc.collect()
    release_process_group()


# --------------------------------------------------------------------------- jobs, from the parent


def free_port() -> int:
    from disttrain.spawn import free_port as below_the_ephemeral_range

    return below_the_ephemeral_range()


def job_env(scratch: str) -> dict[str, str]:
    """One thread per process (2 processes on 2 cores), scratch files and DeepSpeed's op cache in place."""
    launcher = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}
    env = {k: v for k, v in os.environ.items() if k not in launcher and not k.startswith("ACCELERATE_")}
    env.update(
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        TMPDIR=scratch,
        WANDB_MODE="disabled",
        PYTHONUNBUFFERED="1",
        TORCH_EXTENSIONS_DIR=str(REPO / ".cache" / "torch_extensions"),
        PYTHONPATH=os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]),
    )
    return env


def run_job(module: str, args: Sequence[str], nproc: int = WORLD_SIZE, timeout: float = 600) -> dict:
    """Run `python -m module` on `nproc` processes under torchrun and return rank 0's JSON result."""
    with tempfile.TemporaryDirectory(prefix="disttrain-bench-") as scratch:
        out = os.path.join(scratch, "result.json")
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={nproc}",
            "--master_addr=127.0.0.1",
            f"--master_port={free_port()}",
            "-m",
            module,
            "--out",
            out,
            *args,
        ]
        run_command(cmd, job_env(scratch), timeout)
        with open(out) as f:
            return json.load(f)


def run_command(cmd: Sequence[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    """Run a command from the repository root; fail with the end of its output."""
    try:
        done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise RuntimeError(f"{' '.join(cmd)}: no result after {timeout}s\n{e.stdout}\n{e.stderr}") from e
    if done.returncode != 0:
        # A failing rank's traceback comes tagged; the launcher's own report after it says little.
        ranks = [line for line in done.stderr.splitlines() if line.startswith("[rank")]
        detail = "\n".join(ranks[-60:]) if ranks else done.stderr[-4000:]
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout[-2000:]}\n{detail}")
    return done


# --------------------------------------------------------------------------- statistics


def spread(values: Sequence[float]) -> dict[str, float]:
    """Median and interquartile range of a sample."""
    if len(values) == 1:
        return {"median": values[0], "q1": values[0], "q3": values[0], "n": 1}
    q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return {"median": median, "q1": q1, "q3": q3, "n": len(values)}


def paired_ratios(a: Sequence[float], b: Sequence[float]) -> dict[str, float]:
    """a/b repetition by repetition (both measured in the same repetition), then their spread."""
    return spread([x / y for x, y in zip(a, b, strict=True)])


def paired_differences(a: Sequence[float], b: Sequence[float], divisor: float = 1.0) -> dict[str, float]:
    return spread([(x - y) / divisor for x, y in zip(a, b, strict=True)])
