"""N fresh processes in a real gloo process group on this machine: the exactness check's and
the multi-process tests' one launcher.

`run_distributed(fn, world_size, *args)` runs `fn(*args)` on every rank (with RANK, WORLD_SIZE,
MASTER_ADDR/PORT set, so Accelerate sees a multi-process CPU run) and returns each rank's result.
`fn` must be importable by module path (each process imports it). A failure on any rank raises
here with that rank's traceback; a hang is killed after `timeout`.
"""

from __future__ import annotations

import atexit
import gc
import os
import pickle
import signal
import socket
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch.multiprocessing as mp

from disttrain.parent_death import signal_on_parent_death
from disttrain.unix_sockets import short_socket_dir

# Ports come from below Linux's ephemeral range (32768-60999), in turn. A port taken from that range
# with bind(0) and released is free for the kernel to hand to any other socket (the source port of an
# outgoing connection, another bind(0)) before the launcher binds it; under load that race made
# end-to-end launches fail now and then. Below the range, only an explicit bind can take a port, and
# each call here moves on to the next one.
_PORTS = range(20_000, 32_000)
_next_port = [_PORTS.start + (os.getpid() * 7919) % len(_PORTS)]


def free_port() -> int:
    """A port no socket holds now, that the kernel will not hand out by itself, and that this
    process has not handed out before."""
    for _ in range(len(_PORTS)):
        port = _PORTS.start + (_next_port[0] - _PORTS.start) % len(_PORTS)
        _next_port[0] += 1
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue  # held by someone else
            return port
    raise RuntimeError(f"no free port in {_PORTS}")


# Processes fork from a server that imported these once (torch, Accelerate, the trainer: about 1.5 s
# of CPU per process otherwise). It imports nothing else and runs no torch op, so no thread pool
# exists to be forked; each process then imports what its function needs.
_PRELOAD = ["disttrain.trainer"]


def _context() -> Any:
    if "forkserver" not in mp.get_all_start_methods():  # Windows: each process imports everything
        return mp.get_context("spawn")
    short_socket_dir()  # the server listens on a socket under TMPDIR, which may be too long for one
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)
    return ctx


def _worker(
    rank: int, world_size: int, port: int, out_dir: str, env: dict[str, str], fn: Callable, args: tuple
) -> None:
    # Forked by the server, which ends with its caller: so does this process, even when the caller
    # was killed before it could end it.
    signal_on_parent_death(signal.SIGKILL)
    # The server's environment is the one it started with: take the caller's as it is now (and
    # forget a temporary directory the server's imports may have looked up under its TMPDIR).
    os.environ.clear()
    os.environ.update(env)
    tempfile.tempdir = None
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        OMP_NUM_THREADS="1",
    )
    import torch

    torch.set_num_threads(1)
    try:
        result: Any = ("ok", fn(*args))
    except BaseException:
        result = ("error", traceback.format_exc())
    with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
        pickle.dump(result, f)
    _shutdown(result[0] == "ok")


def _shutdown(barrier: bool) -> None:
    """Free everything, meet, then destroy the group: gloo aborts at exit otherwise (seen ~12%)."""
    import torch.distributed as dist
    from accelerate.state import AcceleratorState, PartialState

    from disttrain.engines.process_group import release_process_group

    gc.collect()
    if barrier:
        release_process_group()
    elif dist.is_initialized():
        dist.destroy_process_group()
    AcceleratorState._reset_state(reset_partial_state=True)
    PartialState._reset_state()


# Processes started and not yet ended. At exit multiprocessing joins its children, which would wait
# for ranks that a caller in another thread left running: they are killed first.
_LIVE: set = set()


@atexit.register
def _kill_live() -> None:
    for p in list(_LIVE):
        if p.is_alive():
            p.kill()


def run_distributed(fn: Callable, world_size: int, *args: Any, timeout: float = 240) -> list[Any]:
    """Run `fn(*args)` on `world_size` gloo ranks; return the ranks' results in rank order."""
    with tempfile.TemporaryDirectory(prefix="disttrain-dist-") as out_dir:
        ctx = _context()
        port, env = free_port(), dict(os.environ)
        procs = [
            ctx.Process(target=_worker, args=(r, world_size, port, out_dir, env, fn, args)) for r in range(world_size)
        ]
        _LIVE.update(procs)
        try:
            for p in procs:
                p.start()
            deadline = time.monotonic() + timeout
            for p in procs:
                p.join(max(0.0, deadline - time.monotonic()))
            hung = [r for r, p in enumerate(procs) if p.is_alive()]
        finally:  # also when the caller is interrupted (Ctrl-C, a test suite's SIGTERM)
            for p in procs:
                if p.is_alive():
                    p.kill()
                    p.join()
            _LIVE.difference_update(procs)
        results = []
        for r in range(world_size):
            path = os.path.join(out_dir, f"rank{r}.pkl")
            if not os.path.exists(path):
                reason = "hung" if r in hung else f"died with exit code {procs[r].exitcode}"
                raise RuntimeError(f"rank {r} of {world_size} {reason} before reporting a result")
            with open(path, "rb") as f:
                status, value = pickle.load(f)
            if status == "error":
                raise RuntimeError(f"rank {r} of {world_size} failed:\n{value}")
            results.append(value)
        return results
