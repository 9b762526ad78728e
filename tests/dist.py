"""The one launcher for multi-process tests: N spawned processes in a real gloo process group.

It is the package's own (`disttrain.spawn`, which `python -m disttrain.check` uses too).
`run_distributed(fn, world_size, *args)` runs `fn(*args)` on every rank and returns each rank's
result; a failure on any rank raises with that rank's traceback; a hang is killed after `timeout`.
"""

from disttrain.spawn import free_port, run_distributed

__all__ = ["free_port", "run_distributed"]
