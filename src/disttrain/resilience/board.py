"""The job's notice board, kept in the store every process of the job reaches (the TCPStore at
MASTER_ADDR:MASTER_PORT that the launcher or the first process serves): each process's heartbeat,
and the first failure any process posts, so that the others end at once and name it instead of
waiting in a collective for a process that is gone.

A store call can block without end when the process serving the store is stopped (SIGSTOP, a
frozen rank 0 under a launcher that serves no store of its own). Every call runs in the board's
own thread; the watchdog waits for an answer only as long as it chooses, then goes on without one.
Once the store's host has ended (a broken connection: a store client never reconnects), the board
stops calling it: each failed call prints a C++ trace of 2 KB, one per beat, on every process.
"""

from __future__ import annotations

import datetime
import json
import os
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

CONNECT_TIMEOUT_S = 30.0
# A store client's connection, once its peer closed it, stays broken (torch's TCPStore does not reconnect).
ENDED = ("Broken pipe", "Connection reset")


class _Request:
    def __init__(self, call: Callable[[Any], Any]):
        self.call, self.result, self.done = call, None, threading.Event()


class Board:
    """Heartbeats and the first failure of the job's processes under `key` in the store."""

    def __init__(self, key: str, rank: int, world: int, beat_s: float, heartbeat: Callable[[], dict]):
        self.key, self.rank, self.world, self.beat_s = key, rank, world, beat_s
        self.heartbeat = heartbeat
        self.notice: dict | None = None  # the first failure posted, once this process has seen it
        self.answered: float | None = None  # monotonic time of the store's last answer
        self.error = ""  # the store's last error, if its last call failed
        self._requests: queue.Queue[_Request | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="disttrain-board", daemon=True)

    @classmethod
    def for_job(cls, key: str, rank: int, world: int, beat_s: float, heartbeat: Callable[[], dict]) -> Board | None:
        """The board of a job of several processes whose store is announced (MASTER_ADDR, MASTER_PORT)."""
        if world < 2 or not os.environ.get("MASTER_ADDR") or not os.environ.get("MASTER_PORT"):
            return None
        return cls(key, rank, world, beat_s, heartbeat)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._requests.put(None)
        self._thread.join(timeout=1.0)  # a thread stuck in a store call is a daemon: left behind

    # ------------------------------------------------------------------ asked by the watchdog

    def post(self, notice: dict, wait_s: float) -> dict | None:
        """Post `notice` unless another process posted first; the first notice (this one or the
        earlier), or None if the store did not answer within `wait_s`."""
        text = json.dumps(notice)
        first = self._ask(lambda store: store.compare_set(self._name("failure"), "", text), wait_s)
        if first is None:
            return None
        self.notice = json.loads(first)
        return self.notice

    def read_notice(self, wait_s: float) -> dict | None:
        """The first failure posted, read now (None: none, or no answer within `wait_s`)."""
        name = self._name("failure")
        found = self._ask(lambda store: store.get(name) if store.check([name]) else b"", wait_s)
        if found:
            self.notice = json.loads(found)
        return self.notice

    def heartbeats(self, wait_s: float) -> dict[int, dict] | None:
        """Every process's last heartbeat (rank -> record), or None if the store did not answer."""

        def read(store: Any) -> dict[int, dict]:
            beats = {}
            for r in range(self.world):
                name = self._name(f"beat/{r}")
                if store.check([name]):
                    beats[r] = json.loads(store.get(name))
            return beats

        return self._ask(read, wait_s)

    # ------------------------------------------------------------------ the board's thread

    def _name(self, what: str) -> str:
        return f"disttrain/{self.key}/{what}"

    def _ask(self, call: Callable[[Any], Any], wait_s: float) -> Any:
        request = _Request(call)
        self._requests.put(request)
        return request.result if request.done.wait(wait_s) else None

    def _run(self) -> None:
        import torch.distributed as dist

        try:
            store = dist.TCPStore(
                os.environ["MASTER_ADDR"],
                int(os.environ["MASTER_PORT"]),
                is_master=False,
                timeout=datetime.timedelta(seconds=CONNECT_TIMEOUT_S),
                wait_for_workers=False,
            )
        except Exception as e:  # no store there (another rendezvous): the watchdog works without a board
            self.error = f"cannot reach the job's store: {e}"
            return
        next_beat, ended = 0.0, False
        while True:
            try:
                request = self._requests.get(timeout=max(0.0, next_beat - time.monotonic()))
            except queue.Empty:
                request = _Request(self._beat)
            if request is None:
                return
            try:
                if not ended:
                    request.result = request.call(store)
                    self.answered, self.error = time.monotonic(), ""
            except Exception as e:  # the watchdog decides alone; a timeout may pass, a broken connection not
                ended = any(words in str(e) for words in ENDED)
                self.error = f"the job's store {'ended' if ended else 'failed'}: {e}"
            request.done.set()
            if request.call == self._beat:
                next_beat = time.monotonic() + self.beat_s

    def _beat(self, store: Any) -> None:
        store.set(self._name(f"beat/{self.rank}"), json.dumps(self.heartbeat()))
        if self.notice is None and store.check([self._name("failure")]):
            self.notice = json.loads(store.get(self._name("failure")))
