"""`profile=true`: a torch.profiler trace of a few optimizer steps, written into the run directory.

Steps `profile_start + 1` to `profile_start + profile_steps` of the run are recorded (the ones
before warm the allocator and compile); each is one `ProfilerStep#<n>` span, n counting from 0 at
the run's first step. The trace is Chrome trace JSON, `<run dir>/profile/rank<r>.pt.trace.json`:
open it in https://ui.perfetto.dev, or point TensorBoard's profiler plugin at `<run dir>/profile`.
The main process records unless `profile_all_processes=true`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Protocol

import torch

PROFILE_DIR = "profile"


class Stepper(Protocol):
    def step(self) -> None: ...


class _NotProfiling:
    def step(self) -> None:
        return None


def trace_path(run_dir: str, rank: int) -> str:
    return os.path.join(run_dir, PROFILE_DIR, f"rank{rank}.pt.trace.json")


@contextlib.contextmanager
def profiled(enabled: bool, start: int, steps: int, run_dir: str, rank: int) -> Iterator[Stepper]:
    """Inside the block, call `.step()` after each optimizer step; the trace is written once the
    recorded steps are done (or when the block ends before them)."""
    if not enabled:
        yield _NotProfiling()
        return
    path = trace_path(run_dir, rank)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    # One warm-up step before recording when there is one: the profiler's own start-up stays out.
    warmup = min(start, 1)
    with torch.profiler.profile(
        activities=activities,
        schedule=torch.profiler.schedule(wait=start - warmup, warmup=warmup, active=steps, repeat=1),
        on_trace_ready=lambda prof: prof.export_chrome_trace(path),
        record_shapes=True,
        with_stack=False,  # stacks make the trace several times larger
    ) as profiler:
        yield profiler
