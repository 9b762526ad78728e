"""`python -m bench` (`make bench`): run every comparison, each as its own job, and write BENCHMARKS.md.

    python -m bench                      # everything, 15 to 20 interleaved repetitions (about 25 minutes on 2 cores)
    python -m bench --quick              # 3 repetitions and short blocks, for development
    python -m bench --only loop,comm     # some sections (loop comm peers memory startup gpu data sharding speed checkpoint)
    python -m bench --render BENCHMARKS.json   # rewrite BENCHMARKS.md from saved results

The raw results live beside the report, in BENCHMARKS.json (committed with it). A run starts from
that file and replaces only the sections it runs, so `--only gpu` on a GPU machine adds the GPU
figures to the CPU ones measured elsewhere; each section keeps the environment (machine, date,
commit, versions, load average) it was measured in, and the report says where each comes from.
A section skipped for want of hardware or a package (no GPU, no Lightning) keeps its earlier
figures. The file is written again as each section finishes, so a failing section keeps the
others. Delete it to start over. Nothing here asserts anything about time.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from importlib import metadata
from typing import Any

from bench import results
from bench.harness import REPO, run_job

SECTIONS = ("loop", "comm", "peers", "memory", "startup", "gpu", "data", "sharding", "speed", "checkpoint")


def now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="minutes")


def commit() -> str:
    """The commit measured, `-dirty` if the code differs from it. The report and its raw results
    are left out: a run rewrites them, and a later run would otherwise always read dirty."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()

    head = git("describe", "--always")
    changed = git("status", "--porcelain", "--", ".", ":!BENCHMARKS.md", ":!BENCHMARKS.json")
    return f"{head}-dirty" if head and changed else head or "unknown"


def environment() -> dict[str, Any]:
    """Where and with what this run measures; each section adds its own start and load averages."""

    def version(package: str) -> str:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return "not installed"

    with open("/proc/cpuinfo") as f:
        names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    cpu = names[0] if names else platform.processor() or "unknown"
    with open("/proc/meminfo") as f:
        memory_gib = int(f.readline().split()[1]) / 2**20
    try:
        import torch

        gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except ImportError:
        gpus = []
    return {
        "run_started": now(),  # the same for every section of a run; each adds its own "date"
        "commit": commit(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(memory_gib, 1),
        "os": f"{platform.system()} {platform.release()}",
        "gpus": gpus,
        "python": platform.python_version(),
        "versions": {p: version(p) for p in ("torch", "accelerate", "deepspeed", "lightning")},
    }


def sections(quick: bool) -> dict[str, Callable[[], Any]]:
    reps = 3 if quick else 15
    common = ["--reps", str(reps), *(["--quick"] if quick else [])]

    def loop() -> Any:
        # The target needs the finest resolution: more, shorter repetitions than the other sections.
        args = ["--reps", str(3 if quick else 20), *(["--quick"] if quick else [])]
        return {w: run_job("bench.loop", ["--workload", w, *args]) for w in ("1m", "tiny")}

    def peers() -> Any:
        from bench.peers import lightning_version

        if lightning_version() is None:
            return {"skipped": "lightning is not installed (pip install -e '.[bench]')"}
        return run_job("bench.peers", common)

    def memory() -> Any:
        from bench.memory import measure

        return measure(repeats=1 if quick else 3)

    def startup() -> Any:
        from bench.startup import first_step_seconds, help_seconds

        return {"help": help_seconds(3 if quick else 7), "first_step": first_step_seconds(1 if quick else 4)}

    def sharding() -> Any:
        from bench.sharding import measure

        return measure(repeats=1 if quick else 3, steps=3 if quick else 5)

    def checkpoint() -> Any:
        from bench.checkpointing import measure

        return measure(reps=2 if quick else 6)

    def gpu() -> Any:
        import torch

        if not torch.cuda.is_available():
            return {"skipped": "no GPU in this run"}
        from bench.gpu import QUICK_REPS, REPS, measure

        return measure(reps=QUICK_REPS if quick else REPS, rounds=1)

    return {
        "loop": loop,
        "comm": lambda: run_job("bench.comm", common),
        "peers": peers,
        "memory": memory,
        "startup": startup,
        "gpu": gpu,
        # One training process: its one compute thread leaves the second core to the DataLoader's workers.
        "data": lambda: run_job("bench.loading", common, nproc=1),
        "sharding": sharding,
        # One process: compiled against eager steps/s, and memory with activation checkpointing.
        "speed": lambda: run_job("bench.speed", common, nproc=1, timeout=1800),
        "checkpoint": checkpoint,
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 repetitions, short blocks")
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections of {', '.join(SECTIONS)}")
    parser.add_argument("--output", default=str(REPO / "BENCHMARKS.md"))
    parser.add_argument(
        "--results",
        default=str(REPO / "BENCHMARKS.json"),
        help="raw results: the sections run replace theirs in it, the others stay",
    )
    parser.add_argument("--render", metavar="RESULTS_JSON", help="only rewrite the report from saved results")
    args = parser.parse_args()

    from bench.report import render

    failed: list[str] = []
    if args.render:
        saved = results.load(args.render)
    else:
        chosen = [s.strip() for s in args.only.split(",") if s.strip()]
        unknown = sorted(set(chosen) - set(SECTIONS))
        if unknown:
            parser.error(f"unknown sections {unknown}; choose from {', '.join(SECTIONS)}")
        saved = results.load(args.results)
        here = environment()
        for name, run in sections(args.quick).items():
            if name not in chosen:
                continue
            print(f"bench: {name} ...", flush=True)
            env = {**here, "date": now(), "load_average_start": os.getloadavg()}
            this: dict[str, Any] = {"environments": {name: env}, "quick": {name: args.quick}}
            start = time.perf_counter()
            try:
                this["results"] = {name: run()}
            except Exception as e:  # one broken section must not lose the others' results
                this["errors"] = {name: f"{type(e).__name__}: {e}"}
                failed.append(name)
                print(f"bench: {name} failed: {this['errors'][name][-2000:]}", file=sys.stderr, flush=True)
            this["seconds"] = {name: time.perf_counter() - start}
            env["load_average_end"] = os.getloadavg()
            print(f"bench: {name} took {this['seconds'][name]:.0f}s", flush=True)
            earlier = saved["results"].get(name)
            if results.skipped(this.get("results", {}).get(name)) and earlier and not results.skipped(earlier):
                print(f"bench: {name} skipped here; the figures already in {args.results} stay", flush=True)
            saved = results.merge(saved, this)
            results.save(args.results, saved)
    with open(args.output, "w") as f:
        f.write(render(saved))
    print(f"bench: wrote {args.output} (raw results in {args.render or args.results})")
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
