"""Memory: peak memory of one process training one global batch in one go, against the same global
batch in 2 to 16 micro-batches (what accumulation buys).

Each setting runs in a fresh process (`python -m bench.memory --child ...`) with the template's
trainer on one process. Method: the kernel's peak resident set (VmHWM), reset to the current
resident set (`/proc/self/clear_refs`) just before training, so that building the data and the
model does not count; the figure is the peak during two optimizer steps minus the resident set
before them. Resident memory is what torch's CPU allocator really takes from the system (it has
no cache of its own on the CPU); Python-level tracers (tracemalloc) do not see torch's tensors.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from typing import Any

from bench.harness import REPO, WORKLOADS, job_env, run_args, spread

WORKLOAD = "1m"
GLOBAL_BATCH = 192
ACCUMULATIONS = (1, 2, 4, 8, 16)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M).group(1))


def child(accumulation: int, out: str) -> None:
    from bench.harness import build_trainer

    with tempfile.TemporaryDirectory() as runs:
        trainer = build_trainer(
            run_args(WORKLOAD, accumulation, 1, runs, GLOBAL_BATCH // accumulation, windows=4), "memory"
        )
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak resident set to the current one
        before = _status_kib("VmRSS")
        for step in range(2):
            trainer.train_step(step)
        peak = _status_kib("VmHWM")
    with open(out, "w") as f:
        json.dump({"before_kib": before, "peak_kib": peak}, f)


def measure(repeats: int) -> dict[str, Any]:
    """Each setting `repeats` times, settings taking turns; peaks in MiB."""
    raw: dict[int, list[dict[str, int]]] = {a: [] for a in ACCUMULATIONS}
    with tempfile.TemporaryDirectory(prefix="disttrain-bench-") as scratch:
        out = f"{scratch}/memory.json"
        for _ in range(repeats):
            for accumulation in ACCUMULATIONS:
                cmd = [sys.executable, "-m", "bench.memory", "--child", str(accumulation), "--out", out]
                subprocess.run(cmd, cwd=REPO, env=job_env(scratch), check=True, timeout=300)
                with open(out) as f:
                    raw[accumulation].append(json.load(f))
    return {
        "workload": WORKLOAD,
        "overrides": WORKLOADS[WORKLOAD],
        "global_batch": GLOBAL_BATCH,
        "repeats": repeats,
        "settings": {
            str(a): {
                "micro_batch": GLOBAL_BATCH // a,
                "training_peak_mib": spread([(r["peak_kib"] - r["before_kib"]) / 1024 for r in runs]),
                "process_peak_mib": spread([r["peak_kib"] / 1024 for r in runs]),
            }
            for a, runs in raw.items()
        },
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--child", type=int, required=True, help="accumulation count of this setting")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    child(args.child, args.out)
