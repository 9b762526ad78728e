"""The process group's start after a restart, and its end: every engine releases it here, without
gloo's exit deadlock."""

from __future__ import annotations

import datetime
import os
import sys
from collections.abc import Callable
from typing import Any

import torch

from disttrain.restarts import restart_count

# Environment variables set for a one-process group (see release_process_group).
_SET_FOR_ONE_PROCESS: list[str] = []


def set_for_one_process(variables: dict[str, str]) -> None:
    """Set launcher variables a library insists on (DeepSpeed asserts LOCAL_RANK) for a plain
    one-process run; release_process_group takes them back, so that a later run in this process
    (a notebook, a sweep) does not take itself for distributed."""
    for key, value in variables.items():
        if key not in os.environ:
            os.environ[key] = value
            _SET_FOR_ONE_PROCESS.append(key)


def join_restarted_group(timeout_s: int) -> None:
    """A group restarted by `accelerate launch --max_restarts` forms its process group under keys of
    its own attempt.

    The launcher's static rendezvous keeps one store for all attempts, while torch's env://
    initialisation assumes a fresh store per attempt (it adds no prefix): a restarted process then
    reads the failed attempt's gloo addresses and its connections are refused. Accelerate, DeepSpeed
    and FSDP2 take over a process group that exists.
    """
    if (
        not restart_count()
        or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True"
        or torch.distributed.is_initialized()
    ):
        return
    timeout = datetime.timedelta(seconds=timeout_s)
    world_size = int(os.environ["WORLD_SIZE"])
    store = torch.distributed.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size, is_master=False, timeout=timeout
    )
    torch.distributed.init_process_group(
        store=torch.distributed.PrefixStore(f"disttrain/attempt_{restart_count()}", store),
        rank=int(os.environ["RANK"]),
        world_size=world_size,
        timeout=timeout,
    )


def side_group(timeout_s: int) -> Any:
    """A gloo process group of all processes beside the training one, for a thread that must meet
    the others while the main thread trains (a background checkpoint); None without a process group. Every
    process creates it, in the same order as its other groups."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return None
    return torch.distributed.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))


def gather_over(group: Any, to_main: bool = False) -> Callable[[Any], list[Any]]:
    """Every process's value, in rank order, gathered over `group` (None: this process's alone), on
    every process; with `to_main`, on the main process only (the others get an empty list)."""

    def gather(value: Any) -> list[Any]:
        if group is None:
            return [value]
        out: list[Any] = [None] * torch.distributed.get_world_size(group)
        if to_main:
            main = torch.distributed.get_rank() == 0
            torch.distributed.gather_object(value, out if main else None, dst=0, group=group)
            return out if main else []
        torch.distributed.all_gather_object(out, value, group=group)
        return out

    return gather


# Works of each process's last barrier, kept until the process ends (see release_process_group).
_LAST_BARRIERS: list = []


def release_process_group(meet: bool = True) -> None:
    """Meet every rank, then destroy the default process group, without gloo's exit deadlock.

    ProcessGroupGloo's destructor (run when the last holder, e.g. a DDP wrapper, is freed, with the
    GIL held) joins gloo's worker threads. A worker that is still dropping the last reference to a
    finished collective frees tensors owned by Python and waits for the GIL: the process never
    exits. Seen as a hang after "done:" in about 1 of 50 launches under load. Keeping the last
    barrier's work alive means no worker drops a last reference; every earlier work is held by it.
    docs/gloo-exit-hang.md has the stacks and the check.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    if meet:  # not after a failure: a process that died would turn the barrier into a second error
        work = torch.distributed.barrier(async_op=True)
        work.wait()
        _LAST_BARRIERS.append(work)
    deepspeed_comm = sys.modules.get("deepspeed.comm")
    if deepspeed_comm is not None and deepspeed_comm.is_initialized():
        # DeepSpeed's own teardown also forgets the groups it cached, which a later run in this
        # process (a sweep, a notebook) would otherwise use after they are gone.
        deepspeed_comm.destroy_process_group()
    else:
        torch.distributed.destroy_process_group()
    while _SET_FOR_ONE_PROCESS:
        os.environ.pop(_SET_FOR_ONE_PROCESS.pop(), None)
