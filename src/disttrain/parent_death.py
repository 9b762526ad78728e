"""A process that hears of its parent's end: the kernel sends it a signal then (Linux `prctl`).

Ranks ask for SIGTERM when their launcher ends (they stop with a checkpoint); DataLoader workers ask
for SIGKILL when their rank ends (a worker stuck in a dataset's `__getitem__` would never notice).
"""

from __future__ import annotations

import os
import signal

_PR_SET_PDEATHSIG = 1


def signal_on_parent_death(sig: signal.Signals) -> bool:
    """Ask for `sig` when the thread that started this process ends; whether the kernel took it.

    If the parent ended before the request took effect, the signal is sent here at once.
    """
    if not os.path.exists("/proc/self"):
        return False
    import ctypes

    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return False
    if libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        return False
    if os.getppid() != parent:  # it ended before the request took effect
        os.kill(os.getpid(), sig)
    return True
