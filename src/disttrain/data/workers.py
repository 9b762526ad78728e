"""The DataLoader's workers as their process sees them: none may leave it waiting in silence.

A worker ends with its process (a worker stuck in a dataset's `__getitem__` would never notice), its
sockets fit whatever TMPDIR is (disttrain.unix_sockets), and a micro-batch it cannot hand over (a
batch that cannot be pickled, a socket error) ends it with its last words instead of being dropped:
Python's queue would print the error and drop the batch (docs/dataloader-stall.md). Its process can
ask it for its Python stacks, read what it said, and fails naming it when it ends (`loading`).
"""

from __future__ import annotations

import contextlib
import faulthandler
import functools
import multiprocessing
import multiprocessing.queues
import os
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from typing import Any

from torch.utils.data import DataLoader

from disttrain.parent_death import signal_on_parent_death
from disttrain.unix_sockets import short_socket_dir

# A worker's exit status when a micro-batch could not be handed over (BSD's EX_SOFTWARE).
HANDOVER_FAILED = 70
# Asks a worker for its Python stacks (faulthandler writes them into its account).
STACKS_SIGNAL = signal.SIGUSR2 if hasattr(signal, "SIGUSR2") else None
FORKED = "fork" in multiprocessing.get_all_start_methods()  # workers start by fork here


def forked_accounts(num_workers: int) -> WorkerAccounts | None:
    """Accounts for `num_workers` workers, where they are forked (they inherit the files)."""
    return WorkerAccounts(num_workers) if num_workers and FORKED else None


class WorkerAccounts:
    """One anonymous file per DataLoader worker, written by the worker and read by its process: the
    worker's Python stacks when asked (STACKS_SIGNAL) and its last words if it cannot hand a batch
    over. Forked workers inherit them; there are none where workers are not forked."""

    def __init__(self, count: int):
        self.fds = [_anonymous_file(f"disttrain-worker-{i}") for i in range(count)]

    def read(self, worker: int) -> str:
        """What worker `worker` wrote ("" once the accounts are closed: the loader ended meanwhile)."""
        try:
            fd = self.fds[worker]
            return os.pread(fd, os.fstat(fd).st_size, 0).decode(errors="replace")
        except (IndexError, OSError):
            return ""

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []


def _anonymous_file(name: str) -> int:
    if hasattr(os, "memfd_create"):
        return os.memfd_create(name, 0)  # in memory, no name on any disk; not inherited by exec
    fd, path = tempfile.mkstemp(prefix=name)
    os.unlink(path)
    return fd


class WorkerStart:
    """Each worker's first act (the DataLoader's worker_init_fn)."""

    def __init__(self, accounts: WorkerAccounts | None):
        self.fds = tuple(accounts.fds) if accounts is not None else ()

    def __call__(self, worker: int) -> None:
        # Stop signals are the trainer's: the launcher signals the whole process group, and the
        # trainer finishes its step (needing the workers) before it checkpoints and exits.
        for name in ("SIGUSR1", "SIGTERM", "SIGINT", "SIGHUP"):
            if hasattr(signal, name):
                signal.signal(getattr(signal, name), signal.SIG_IGN)
        signal_on_parent_death(signal.SIGKILL)
        short_socket_dir()
        account = self.fds[worker] if self.fds else sys.stderr.fileno()
        if self.fds and STACKS_SIGNAL is not None:
            faulthandler.register(STACKS_SIGNAL, file=account, all_threads=True)
        # The queue's feeder thread pickles and sends each batch; on an error it would print it and
        # drop the batch, leaving the process waiting for it. A class attribute: the hook the queue
        # module provides, set in this worker only.
        multiprocessing.queues.Queue._on_queue_feeder_error = staticmethod(  # type: ignore[method-assign]
            functools.partial(_handover_failed, worker, account)
        )


def _handover_failed(worker: int, account: int, error: BaseException, obj: object) -> None:
    words = f"could not hand a micro-batch over to its process: {type(error).__name__}: {error}\n"
    words += traceback.format_exc()
    os.write(account, words.encode())
    if account != sys.stderr.fileno():
        os.write(sys.stderr.fileno(), f"DataLoader worker {worker} (pid {os.getpid()}) {words}".encode())
    os._exit(HANDOVER_FAILED)


class Workers:
    """The DataLoader workers of a running iterator, as an error message or a stall report sees them."""

    def __init__(self, iterator: Iterator | None, accounts: WorkerAccounts | None):
        self.iterator, self.accounts = iterator, accounts  # the iterator, once it exists

    def describe(self, stacks: bool = False) -> list[str]:
        """A line per worker (pid, alive or its exit status) and what it wrote: its last words, and
        with `stacks` its Python stacks, asked for now (it answers even inside C code)."""
        processes = list(getattr(self.iterator, "_workers", []))
        readable = self.accounts is not None and len(self.accounts.fds) == len(processes)
        if stacks and readable and STACKS_SIGNAL is not None:
            for p in processes:
                if p.is_alive():
                    os.kill(p.pid, STACKS_SIGNAL)
            time.sleep(0.5)  # faulthandler writes from the signal handler: a moment is plenty
        lines = []
        for i, p in enumerate(processes):
            account = self.accounts.read(i).strip().splitlines() if readable else []
            lines.append(self._state(i, p, account))
            lines += [f"    {line}" for line in account]
        return lines

    def ended(self, wait_s: float = 0.0) -> list[str]:
        """A line for each worker that ended: how, and its last words. Waits up to `wait_s` for one
        to be seen ended (an error about a worker may come before its end is reaped)."""
        processes = list(getattr(self.iterator, "_workers", []))
        deadline = time.monotonic() + wait_s
        while processes and all(p.exitcode is None for p in processes) and time.monotonic() < deadline:
            time.sleep(0.05)
        readable = self.accounts is not None and len(self.accounts.fds) == len(processes)
        return [
            self._state(i, p, self.accounts.read(i).strip().splitlines()[:1] if readable else [])  # type: ignore[union-attr]
            for i, p in enumerate(processes)
            if p.exitcode is not None
        ]

    @staticmethod
    def _state(i: int, process: Any, account: list[str]) -> str:
        code = process.exitcode
        if code is None:
            return f"worker {i} (pid {process.pid}): alive"
        words = f": {account[0]}" if code == HANDOVER_FAILED and account else _signal_name(code)
        return f"worker {i} (pid {process.pid}) ended with exit status {code}{words}"

    def kill(self) -> None:
        for p in getattr(self.iterator, "_workers", []):
            if p.is_alive():
                os.kill(p.pid, signal.SIGKILL)


class DataLoaderFailed(RuntimeError):
    """A DataLoader worker ended: the message names it, how it ended and what it said."""


@contextlib.contextmanager
def loading(loader: DataLoader, accounts: WorkerAccounts | None) -> Iterator[Workers]:
    """Iterate `loader` inside the block (`Workers.iterator`); its workers end with the block. A
    worker that ends first fails the block with DataLoaderFailed, naming it and what it said."""
    workers = Workers(None, accounts)
    try:
        workers.iterator = iter(loader)
        yield workers
    except Exception as e:
        # torch's own words (its SIGCHLD handler or its poll of the workers), raised wherever the
        # main thread was, from the workers' start on: "DataLoader worker (pid(s) ...) exited ...";
        # or a batch half-received from a worker that ended meanwhile (ConnectionResetError,
        # EOFError). Any other error is re-raised as it is, once no worker is seen ended.
        for _ in range(3):
            try:
                ended = workers.ended(wait_s=1.0)
                break
            except RuntimeError:  # torch's SIGCHLD handler, telling again of the end being looked at
                ended = []
        if not ended:
            raise
        raise DataLoaderFailed(
            f"a DataLoader worker ended, the data cannot continue: {'; '.join(ended)}\n" + "\n".join(workers.describe())
        ) from e
    finally:
        # The workers end now, not whenever the iterator is collected (the caller's frame may outlive it).
        shutdown = getattr(workers.iterator, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
        if accounts is not None:
            accounts.close()


def _signal_name(code: int) -> str:
    if code < 0:
        try:
            return f" (killed by {signal.Signals(-code).name})"
        except ValueError:
            return ""
    return ""
