"""A suite stopped from outside ends like one stopped with Ctrl-C: every teardown runs.

CI time limits and job schedulers send SIGTERM, whose default action ends pytest at once: no fixture
finaliser, no pytest_sessionfinish, so the SLURM cluster, the Docker daemon and background runs that
the tests started would be left running. Raised as KeyboardInterrupt, it unwinds like Ctrl-C.
"""

from __future__ import annotations

import signal


def _interrupt(signum: int, frame: object) -> None:
    signal.signal(signum, signal.SIG_DFL)  # a second one ends the run at once
    raise KeyboardInterrupt(f"stopped by {signal.Signals(signum).name}")


def pytest_configure(config: object) -> None:
    for stop in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(stop, _interrupt)
