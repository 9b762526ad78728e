"""Room for multiprocessing's AF_UNIX sockets: a temporary directory whose socket paths fit.

multiprocessing listens on AF_UNIX sockets in a temporary directory of each process, under TMPDIR:
a DataLoader worker that hands a batch's tensors over by file descriptor (torch's default sharing
strategy), the forkserver. A socket path has a hard limit (107 bytes on Linux, 103 on macOS), and a
long TMPDIR (a SLURM job's, a deep home, pytest's per-test directories) makes the bind fail. In a
DataLoader worker it fails in the queue's feeder thread, which prints the error and drops the batch:
the training process waited forever for it (seen in this project's suite; docs/dataloader-stall.md).
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.util
import os
import shutil
import sys
import tempfile

# sun_path: 108 bytes on Linux, 104 on macOS and the BSDs, the terminating NUL included.
SUN_PATH = 108 if sys.platform.startswith("linux") else 104
# The names multiprocessing makes: its directory "pymp-XXXXXXXX" (mkdtemp) under TMPDIR, and in
# it each socket "listener-XXXXXXXX" (mktemp).
_DIRECTORY, _SOCKET = len("/pymp-") + 8, len("/listener-") + 8


def fits(base: str) -> bool:
    """Whether multiprocessing's sockets fit under the temporary directory `base`."""
    return len(os.fsencode(base)) + _DIRECTORY + _SOCKET < SUN_PATH


def short_socket_dir() -> str | None:
    """Give this process a multiprocessing temporary directory whose socket paths fit, if the one
    under TMPDIR would not; returns the directory chosen then (None: nothing had to change).

    Call it before the process first listens (a DataLoader worker's initialiser, before a forkserver
    starts). TMPDIR itself is left alone: only where the sockets go changes.
    """
    config = multiprocessing.current_process()._config  # where multiprocessing caches the directory
    current = config.get("tempdir")
    if current is not None and len(os.fsencode(current)) + _SOCKET < SUN_PATH:
        return None
    if current is None and fits(tempfile.gettempdir()):
        return None
    for base in ("/tmp", "/var/tmp", "/dev/shm", os.path.expanduser("~")):
        if fits(base) and os.access(base, os.W_OK | os.X_OK):
            short = tempfile.mkdtemp(prefix="pymp-", dir=base)
            multiprocessing.util.Finalize(None, shutil.rmtree, args=(short, True), exitpriority=-100)
            config["tempdir"] = short
            return short
    return None  # nowhere shorter: the bind fails and names the path
