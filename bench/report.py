"""BENCHMARKS.md from the raw results of `python -m bench`: medians, spreads and ratios."""

from __future__ import annotations

import json
from typing import Any

from bench.harness import WORKLOADS, paired_differences, paired_ratios, spread
from bench.results import per_section

LOOP_TARGET = 0.98  # the template's speed as a fraction of the hand-written loop's, on the 1m work
DATA_TARGET = 0.95  # the trainer with workers, as a fraction of the same trainer fed from memory
DATA_WAIT_TARGET = 0.05
CHECKPOINT_TARGET = 0.2  # a background checkpoint's stall of the step, as a fraction of a synchronous one's  # the share of its wall time the trainer with workers may wait for data


def render(saved: dict[str, Any]) -> str:
    """The report of `saved` (bench/results.py's per-section form, or a results file of one run)."""
    saved = per_section(saved)
    results, errors, environments = saved["results"], saved["errors"], saved["environments"]
    setups = _setups(environments)
    # Sections from different runs (or machines) each say where they come from, under their title.
    provenance = len(setups) > 1 or len({_run(env) for env in environments.values()}) > 1
    out = [_header(saved, setups), _summary(results)]
    for name, section in (
        ("loop", _loop),
        ("comm", _comm),
        ("memory", _memory),
        ("startup", _startup),
        ("peers", _peers),
        ("gpu", _gpu),
        ("data", _data),
        ("sharding", _sharding),
        ("speed", _speed),
        ("checkpoint", _checkpoint),
    ):
        if name in results:
            text = section(results[name])
            if name in errors:
                text = _under_title(
                    text,
                    f"The last attempt to measure it again failed: `{errors[name][-600:]}`. "
                    "The figures below are from the run before.",
                )
        elif name in errors:
            text = f"## {TITLES[name]}\n\nFailed in its last run: `{errors[name][-600:]}`\n"
        elif name == "gpu":
            text = _gpu({"skipped": "not run"})
        else:
            continue
        if provenance and name in environments:
            text = _under_title(text, _measured(environments[name], saved["quick"].get(name, False), setups))
        out.append(text)
    return "\n".join(out)


TITLES = {
    "loop": "1. Loop overhead",
    "comm": "2. Communication",
    "memory": "3. Memory",
    "startup": "4. Startup",
    "peers": "5. Peers: PyTorch Lightning",
    "gpu": "6. GPU throughput",
    "data": "7. Data loading",
    "sharding": "8. Sharding: DDP, ZeRO 2, FSDP2",
    "speed": "9. Speed: compile and activation checkpointing",
    "checkpoint": "10. Checkpoints: synchronous and in the background",
}


# --------------------------------------------------------------------------- formatting


def _x(s: dict[str, float]) -> str:
    return f"{s['median']:.3f}x ({s['q1']:.3f}–{s['q3']:.3f})"


def _ms(s: dict[str, float], sign: bool = False) -> str:
    fmt = "+.2f" if sign else ".2f"
    return f"{s['median'] * 1e3:{fmt}} ms ({s['q1'] * 1e3:{fmt}} to {s['q3'] * 1e3:{fmt}})"


def _pct(s: dict[str, float]) -> str:
    return f"{s['median']:.1%} ({s['q1']:.1%} to {s['q3']:.1%})"


def _speed_ratio(fast: list[float], base: list[float]) -> dict[str, float]:
    """Steps per second of one side over another's, repetition by repetition (time base / time side)."""
    return paired_ratios(base, fast)


# Where a section was measured: sections with the same machine and versions share one setup.
SETUP_KEYS = ("cpu", "cores", "memory_gib", "os", "gpus", "python", "versions")


def _setup_of(env: dict[str, Any]) -> str:
    return json.dumps({k: env.get(k) for k in SETUP_KEYS}, sort_keys=True)


def _setups(environments: dict[str, dict[str, Any]]) -> dict[str, list[str]]:
    """The sections measured on each setup, in the report's order; setups in order of their first section."""
    setups: dict[str, list[str]] = {}
    for name in TITLES:
        if name in environments:
            setups.setdefault(_setup_of(environments[name]), []).append(name)
    return setups


def _run(env: dict[str, Any]) -> str:
    """The run a section came from (a results file of one run has no run_started: its date)."""
    return env.get("run_started") or env.get("date", "")


def _measured(env: dict[str, Any], quick: bool, setups: dict[str, list[str]]) -> str:
    """One line under a section's title: where and when it was measured."""
    where = ", ".join(env.get("gpus") or []) or f"{env.get('cpu', 'unknown CPU')}, {env.get('cores', '?')} cores"
    if len(setups) > 1:
        where += f" (setup {list(setups).index(_setup_of(env)) + 1} above)"
    return (
        f"*Measured on {env.get('date', 'an unknown date')}, commit `{env.get('commit', 'unknown')}`, "
        f"on {where}{'; quick mode' if quick else ''}.*"
    )


def _under_title(text: str, line: str) -> str:
    """`text` (a section: its `## title` line first) with `line` as its first paragraph."""
    title, rest = text.split("\n", 1)
    return f"{title}\n\n{line}\n{rest}"


def _header(saved: dict[str, Any], setups: dict[str, list[str]]) -> str:
    quick = [name for name in TITLES if saved["quick"].get(name)]
    out = [
        "# Benchmarks",
        "",
        "Written by `make bench` (`python -m bench`) from the raw results in `BENCHMARKS.json`. Benchmarks are",
        "not tests: nothing here asserts anything about time. `make bench` measures every section again;",
        '`make bench ARGS="--only gpu"` (any sections, comma-separated) measures those and keeps the others,',
        "so sections may come from different runs and machines: each is listed here with where and when it",
        "was measured.",
        "",
    ]
    if quick:
        out += [
            f"**Quick mode** (`--quick`) for {', '.join(quick)}: few repetitions, short blocks; not for conclusions.",
            "",
        ]
    if len(setups) > 1:
        out += [f"The sections come from {len(setups)} setups (machine and versions):", ""]
    for number, names in enumerate(setups.values(), 1):
        env = saved["environments"][names[0]]
        v = env.get("versions", {})
        if len(setups) > 1:
            out += [f"**Setup {number}**: {', '.join(names)}", ""]
        out += [
            f"- Machine: {env.get('cpu', 'unknown')}, {env.get('cores', '?')} cores, {env.get('memory_gib', '?')} GiB, "
            f"{env.get('os', 'unknown OS')}; GPUs: {', '.join(env.get('gpus') or []) or 'none'}",
            f"- Versions: Python {env.get('python', '?')}, "
            + ", ".join(f"{p} {v[p]}" for p in ("torch", "accelerate", "deepspeed", "lightning") if p in v),
            "- Sections (started, commit, wall time, 1-minute load average at its start and end):",
            *(f"  - {_section_line(saved, name)}" for name in names),
            "",
        ]
    out += [
        "Other processes may have shared a machine (hence the load averages). That is why every comparison",
        "runs its sides in turn, in one job, on the same steps of the same data, and why each figure is a",
        "median over repetitions with its interquartile range in parentheses.",
        "",
    ]
    return "\n".join(out)


def _section_line(saved: dict[str, Any], name: str) -> str:
    env = saved["environments"][name]
    load = env.get("load_average_start")
    load_end = env.get("load_average_end", load)
    parts = [TITLES[name], env.get("date", "date unknown"), f"`{env.get('commit', 'unknown')}`"]
    if name in saved["seconds"]:
        parts.append(f"{saved['seconds'][name]:.0f} s")
    if load:
        parts.append(f"load {load[0]:.2f} → {load_end[0]:.2f}")
    if saved["quick"].get(name):
        parts.append("quick")
    if name in saved["errors"]:
        parts.append("failed" if name not in saved["results"] else "figures from before a failed attempt")
    return ", ".join(parts)


def _summary(results: dict[str, Any]) -> str:
    rows = []
    loop = results.get("loop", {})
    if "1m" in loop:
        r = loop["1m"]
        wall = _speed_ratio(r["seconds"]["template"], r["seconds"]["hand"])
        cpu = _speed_ratio(r["cpu_seconds"]["template"], r["cpu_seconds"]["hand"])
        verdict = "met" if wall["median"] >= LOOP_TARGET else "missed"
        rows.append(
            (
                "Template / hand-written DDP loop, steps/s, 1.07 M model",
                _x(wall),
                f"≥ {LOOP_TARGET}x: {verdict}; by CPU time {_x(cpu)}",
            )
        )
        rows.append(_ratio_row(r, "accelerate", "hand", "Accelerate `accumulate` / hand-written loop, 1.07 M model"))
        if "template_unwatched" in r["seconds"]:
            label = "Stall watchdog: template / the same recording no progress, steps/s, 1.07 M model"
            rows.append(_ratio_row(r, "template", "template_unwatched", label, "; compare with the noise floor below"))
        if "progress" in r:
            p = r["progress"]
            per_step = p["records_per_step"] * p["seconds_per_record"]
            step = spread([t / r["steps_per_rep"] for t in r["seconds"]["template"]])["median"]
            rows.append(
                (
                    "Stall watchdog's records per step x CPU per record, 1.07 M model",
                    f"{p['records_per_step']} x {p['seconds_per_record'] * 1e9:.0f} ns = {per_step * 1e6:.1f} µs",
                    f"{per_step / step:.4%} of a step; the watchdog's thread sleeps between beats (5 s by default)",
                )
            )
        if "hand_copy" in r["seconds"]:
            label = "Noise floor: the hand loop / an identical copy of it, 1.07 M model"
            rows.append(_ratio_row(r, "hand_copy", "hand", label, "; 1.000x with no noise"))
    if "tiny" in loop:
        t = loop["tiny"]
        ours, ours_cpu = _added(t, "template")
        theirs, theirs_cpu = _added(t, "accelerate")
        verdict = "met" if ours["median"] <= theirs["median"] else "missed"
        rows.append(
            (
                "Template's added wall time per micro-step, tiny model",
                _ms(ours, sign=True),
                f"≤ Accelerate's: {verdict}; CPU per process {_ms(ours_cpu, sign=True)}",
            )
        )
        rows.append(
            (
                "Accelerate's added wall time per micro-step, tiny model",
                _ms(theirs, sign=True),
                f"CPU per process {_ms(theirs_cpu, sign=True)}",
            )
        )
    peers = results.get("peers", {})
    if "seconds" in peers:
        wall = _speed_ratio(peers["seconds"]["lightning"], peers["seconds"]["template"])
        cpu = _speed_ratio(peers["cpu_seconds"]["lightning"], peers["cpu_seconds"]["template"])
        rows.append(("Lightning / template, steps/s, 1.07 M model", _x(wall), f"by CPU time {_x(cpu)}"))
    comm = results.get("comm", {})
    if "counts" in comm:
        c = comm["counts"]
        floor = c["floor"]["gradient_bytes"]
        rows.append(
            (
                "Gradient bytes all-reduced per step: template / floor",
                f"{c['sides']['template']['gradient_bytes'] / floor:.2f}x",
                f"sync every micro-step: {c['sides']['hand_sync_every']['gradient_bytes'] / floor:.2f}x",
            )
        )
    if "count_allreduce_seconds" in comm and loop:
        latency = comm["count_allreduce_seconds"]["median"]
        shares = ", ".join(
            f"{w} {latency / (spread(r['seconds']['template'])['median'] / r['steps_per_rep']):.2%}"
            for w, r in loop.items()
        )
        rows.append(
            (
                "The template's item-count all-reduce, share of its step time",
                shares,
                _ms(comm["count_allreduce_seconds"]) + " per call",
            )
        )
    if "gain" in comm:
        for acc, g in comm["gain"].items():
            s = g["seconds"]
            rows.append(
                (f"Time per step saved by skipping sync (template), accumulation {acc}", _pct(_gain(s, "template")), "")
            )
    memory = results.get("memory", {})
    if "settings" in memory:
        m = memory["settings"]
        first, last = m[min(m, key=int)], m[max(m, key=int)]
        rows.append(
            (
                f"Training peak memory, accumulation {max(m, key=int)} / 1 (same global batch)",
                f"{last['training_peak_mib']['median'] / first['training_peak_mib']['median']:.2f}x",
                "",
            )
        )
    startup = results.get("startup", {})
    if "first_step" in startup:
        fs = startup["first_step"]
        rows.append(
            (
                "Launch to first optimizer step: DeepSpeed ZeRO 2 / DDP (2 processes)",
                f"{fs['deepspeed_zero2']['first_step']['median'] / fs['ddp']['first_step']['median']:.2f}x",
                f"{fs['ddp']['first_step']['median']:.1f} s vs {fs['deepspeed_zero2']['first_step']['median']:.1f} s",
            )
        )
    rows += _data_summary(results.get("data", {}))
    for name, r in results.get("checkpoint", {}).get("runs", {}).items():
        engine, model = name.split("/")
        met = "met" if r["in_step_ratio"] <= CHECKPOINT_TARGET else "missed"
        rows.append(
            (
                f"Checkpoint stall in the step, background / synchronous, {engine.upper()}, {model.upper()} model",
                f"{r['in_step_ratio']:.2f}x",
                f"≤ {CHECKPOINT_TARGET}x: {met}; {_ms(r['in_step']['async'])} vs {_ms(r['in_step']['sync'])}",
            )
        )
    table = "\n".join(f"| {a} | {b} | {c} |" for a, b, c in rows)
    return f"""## Summary

| comparison | median (interquartile range) | target / note |
|---|---|---|
{table}
"""


def _ratio_row(run: dict[str, Any], side: str, base: str, label: str, note: str = "") -> tuple[str, str, str]:
    """A summary row: steps/s of `side` over `base`'s, by wall time, and by CPU time in the note."""
    wall = _speed_ratio(run["seconds"][side], run["seconds"][base])
    cpu = _speed_ratio(run["cpu_seconds"][side], run["cpu_seconds"][base])
    return label, _x(wall), f"by CPU time {_x(cpu)}{note}"


def _added(run: dict[str, Any], side: str) -> tuple[dict[str, float], dict[str, float]]:
    """Wall and per-process CPU seconds that `side` adds to the hand loop per micro-step."""
    micro = run["steps_per_rep"] * run["accumulation"]
    wall = paired_differences(run["seconds"][side], run["seconds"]["hand"], micro)
    cpu = paired_differences(run["cpu_seconds"][side], run["cpu_seconds"]["hand"], micro * run["world_size"])
    return wall, cpu


def _gain(seconds: dict[str, list[float]], side: str) -> dict[str, float]:
    """Share of the sync-every-micro-step time that `side` saves, repetition by repetition."""
    return spread([1 - t / base for t, base in zip(seconds[side], seconds["hand_sync_every"], strict=True)])


def _data_wait_share(run: dict[str, Any], side: str) -> dict[str, float]:
    """The share of each block's wall time that `side` spent waiting for its micro-batches."""
    return spread([w / t for w, t in zip(run["data_wait_seconds"][side], run["seconds"][side], strict=True)])


def _data_summary(data: dict[str, Any]) -> list[tuple[str, str, str]]:
    if "seconds" not in data:
        return []
    s, c, rows = data["seconds"], data["cpu_seconds"], []
    for side, workers in data["workers"].items():
        if side == "memory":
            continue
        speed, share = _speed_ratio(s[side], s["memory"]), _data_wait_share(data, side)
        cpu = f"training process CPU {_x(_speed_ratio(c[side], c['memory']))}"
        if side == "memory_copy":
            rows.append(
                ("Noise floor: fed from memory / an identical copy, decoded images", _x(speed), "1.000x with no noise")
            )
        elif workers:
            verdict = "met" if speed["median"] >= DATA_TARGET else "missed"
            wait_verdict = "met" if share["median"] < DATA_WAIT_TARGET else "missed"
            rows.append(
                (
                    f"Trainer with {workers} DataLoader worker{'s' if workers > 1 else ''} / the same trainer fed "
                    "from memory, steps/s, decoded images",
                    _x(speed),
                    f"≥ {DATA_TARGET}x: {verdict}; data-wait share {_pct(share)} "
                    f"(< {DATA_WAIT_TARGET:.0%}: {wait_verdict}); {cpu}",
                )
            )
        else:
            rows.append(
                (
                    "Trainer loading inline (0 workers) / fed from memory, steps/s, decoded images",
                    _x(speed),
                    f"the stall workers remove: data-wait share {_pct(share)}",
                )
            )
    return rows


# --------------------------------------------------------------------------- sections


def _loop(loop: dict[str, Any]) -> str:
    rows = []
    for workload, r in loop.items():
        s, c, steps = r["seconds"], r["cpu_seconds"], r["steps_per_rep"]
        hand_step = spread([t / steps for t in s["hand"]])
        for side in ("template", "template_unwatched", "accelerate", "hand_copy"):
            if side not in s:
                continue
            wall, cpu = _added(r, side)
            rows.append(
                f"| {workload} ({r['parameters'] / 1e6:.3g} M) | {side} | {_x(_speed_ratio(s[side], s['hand']))} "
                f"| {_x(_speed_ratio(c[side], c['hand']))} | {_ms(wall, sign=True)} | {_ms(cpu, sign=True)} "
                f"| {_ms(spread([t / steps for t in s[side]]))} | {_ms(hand_step)} |"
            )
    any_run = next(iter(loop.values()))
    return f"""## {TITLES["loop"]}

Optimizer steps per second of the template's `Trainer.train_step` and of Accelerate's documented
`accumulate` loop, each over a minimal hand-written DDP loop (`no_sync` around forward and backward
of all micro-batches but the last, mean loss / accumulation, clip, step, zero) doing the same work:
seq2seq Transformer (`bench/harness.py` WORKLOADS), world size {any_run["world_size"]} (gloo, one thread per
process), accumulation {any_run["accumulation"]}, micro-batch {", ".join(f"{w}: {r['micro_batch']}" for w, r in loop.items())},
the same micro-batches and AdamW settings on every side. Each of {any_run["reps"]} repetitions times
{", ".join(f"{r['steps_per_rep']} steps ({w})" for w, r in loop.items())} per side, sides in a shuffled order. `hand_copy` is a second, identical hand loop: its figures
show how far this run's noise alone moves a ratio. The stall watchdog runs beside every side, as in
a run (`Trainer.watched`); `template_unwatched` is the same trainer recording no progress for it.
Speed: steps/s of the side over the hand loop's, per repetition, by wall-clock time (the target's
measure) and by CPU time summed over the processes (which leaves out time spent descheduled by other
load on the machine, and time blocked in collectives). Added: (side − hand) per micro-step, wall
time, and CPU time per process. The template's one extra all-reduce per step (the window's item
counts) is inside these figures.

| model | side | speed vs hand loop (wall) | (CPU) | added per micro-step (wall) | (CPU per process) | time per step | hand loop per step |
|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}

1m: `{" ".join(WORKLOADS["1m"])}`; tiny: `{" ".join(WORKLOADS["tiny"])}` (configs/debug.yaml's size).
"""


def _comm(comm: dict[str, Any]) -> str:
    c = comm["counts"]
    floor = c["floor"]
    rows = []
    for name, label in (
        ("template", "template"),
        ("hand_no_sync", "hand loop, `no_sync`"),
        ("hand_sync_every", "hand loop, sync every micro-step"),
    ):
        d = c["sides"][name]
        rows.append(
            f"| {label} | {d['gradient_calls']:.0f} | {d['gradient_bytes'] / 1e6:.3f} | "
            f"{d['gradient_bytes'] / floor['gradient_bytes']:.2f}x | {d['other_calls']:.0f} | {d['other_bytes']:.0f} |"
        )
    rows.append(f"| floor: one reduction of the gradients | 1 | {floor['gradient_bytes'] / 1e6:.3f} | 1.00x | 0 | 0 |")
    gain_rows = []
    for acc, g in comm["gain"].items():
        s, steps = g["seconds"], g["steps_per_rep"]
        sync_step = spread([t / steps for t in s["hand_sync_every"]])
        gain_rows.append(
            f"| {acc} | {_ms(sync_step)} | {_pct(_gain(s, 'hand_no_sync'))} | {_pct(_gain(s, 'template'))} |"
        )
    latency = comm["count_allreduce_seconds"]
    return f"""## {TITLES["comm"]}

All-reduces per optimizer step on the 1m model, accumulation {c["accumulation"]}, world size {comm["world_size"]},
{c["parameters"]:,} parameters (float32 gradients). Gradient all-reduces are counted by a DDP comm
hook wrapping the default all-reduce; "other" is every other `torch.distributed.all_reduce` of the
step. DDP splits one reduction into buckets (25 MB, the first one 1 MB), so the floor's one
reduction is {c["sides"]["hand_no_sync"]["gradient_calls"]:.0f} calls here.

| side | gradient all-reduce calls | MB | vs floor | other all-reduces | their bytes |
|---|---|---|---|---|---|
{chr(10).join(rows)}

The template's other all-reduce is the window's item count (one float64 per loss term). Alone, back to
back, it takes {_ms(latency)} per call here.

Wall-clock gain of skipping sync: time per optimizer step saved against the same hand-written
loop synchronising on every micro-step, per repetition ({comm["reps"]} repetitions, sides in turn,
{", ".join(f"{g['steps_per_rep']} steps at {a}" for a, g in comm["gain"].items())} per block).

| accumulation | sync every micro-step, per step | saved by hand loop with `no_sync` | saved by the template |
|---|---|---|---|
{chr(10).join(gain_rows)}

At accumulation 1 there is nothing to skip: that row shows the noise (hand loop) and the template's
fixed cost per optimizer step (item-count all-reduce, bookkeeping) against a plain loop.
"""


def _memory(m: dict[str, Any]) -> str:
    settings = m["settings"]
    base = settings[min(settings, key=int)]["training_peak_mib"]["median"]
    rows = [
        f"| {acc} | {s['micro_batch']} | {s['training_peak_mib']['median']:.1f} "
        f"({s['training_peak_mib']['q1']:.1f}–{s['training_peak_mib']['q3']:.1f}) | "
        f"{s['training_peak_mib']['median'] / base:.2f}x | {s['process_peak_mib']['median']:.0f} |"
        for acc, s in sorted(settings.items(), key=lambda kv: int(kv[0]))
    ]
    return f"""## {TITLES["memory"]}

One process, the template's trainer, the 1m model, global batch {m["global_batch"]} as one batch
(accumulation 1) or in micro-batches. Each setting in a fresh process, {m["repeats"]} run(s) each, settings
in turn. Method: the kernel's peak resident set (`VmHWM`), reset (`/proc/self/clear_refs`) just
before two optimizer steps; "training peak" is that peak minus the resident set before the steps
(activations, gradients, optimizer state, allocator slack). torch's CPU allocator takes memory
straight from the system, so the resident set sees every tensor; tracemalloc would not.

| accumulation | micro-batch | training peak, MiB | vs one batch | whole process peak, MiB |
|---|---|---|---|---|
{chr(10).join(rows)}
"""


def _startup(st: dict[str, Any]) -> str:
    fs = st["first_step"]
    rows = [
        f"| {name} | {s['config']['median']:.2f} | {s['trainer']['median']:.2f} | "
        f"{s['first_step']['median']:.2f} ({s['first_step']['q1']:.2f}–{s['first_step']['q3']:.2f}) |"
        for name, s in fs.items()
    ]
    h = st["help"]
    return f"""## {TITLES["startup"]}

`python train.py --help`: {h["median"]:.2f} s ({h["q1"]:.2f}–{h["q3"]:.2f}), {h["n"]} runs.

From starting `accelerate launch` (2 processes, `configs/debug.yaml`) to the end of each stage on
rank 0, seconds, {next(iter(fs.values()))["first_step"]["n"]} runs each, the two in turn. DeepSpeed's
shared-memory op comes from its cache (`TORCH_EXTENSIONS_DIR=.cache/torch_extensions`): its one-time
compile (30 to 80 s) is not counted.

| launcher config | config parsed | trainer built | first optimizer step done |
|---|---|---|---|
{chr(10).join(rows)}
"""


def _peers(p: dict[str, Any]) -> str:
    if "skipped" in p:
        return f"## {TITLES['peers']}\n\nNot measured: {p['skipped']}.\n"
    s, c = p["seconds"], p["cpu_seconds"]
    steps = p["steps_per_rep"]
    rows = [
        f"| {side} | {_x(_speed_ratio(s[side], s['template']))} | {_x(_speed_ratio(c[side], c['template']))} "
        f"| {_ms(spread([t / steps for t in s[side]]))} |"
        for side in ("lightning", "hand")
    ]
    return f"""## {TITLES["peers"]}

PyTorch Lightning {p["lightning"]} `Trainer(accumulate_grad_batches={p["accumulation"]}, strategy="ddp")` on the
same model, micro-batches, loss (mean / accumulation) and AdamW settings as the others (one
optimizer with the encoder's and decoder's parameter groups: Lightning's automatic optimization takes
one; clipped per half like the others), no logger, progress bar, summary or checkpoints. Lightning
drives its loop; a callback stops its clock after each block of {steps} steps and runs the template and
the hand loop on the same steps. {p["reps"]} repetitions, 1m model, world size {p["world_size"]}. Lightning made
{p["lightning_steps"]} optimizer steps and its clipping hook ran {p["lightning_clipped_steps"]} times.

| side | speed vs template (wall) | (CPU) | time per step |
|---|---|---|---|
{chr(10).join(rows)}
| template | 1 | 1 | {_ms(spread([t / steps for t in s["template"]]))} |
"""


# What `--cpu-smoke` cannot run on CPU, and why (the last check's outcome; bench/gpu.py's docstring says how).
GPU_SMOKE_FAILURES = "every cell runs, eager and compiled."
GPU_ENGINES = {"ddp": "DDP", "zero2": "DeepSpeed ZeRO 2", "fsdp2": "FSDP2"}


def _gpu(g: dict[str, Any]) -> str:
    from bench import gpu

    command = 'make bench ARGS="--only gpu"'
    if "skipped" in g:
        recipes = "\n".join(
            f"- {r}, micro-batch {gpu.MICRO_BATCH[r]}: `{' '.join(a[1:])}`" for r, a in gpu.RECIPE_ARGS.items()
        )
        engines = ", ".join(GPU_ENGINES[e] for e in gpu.ENGINES)
        cells = len(gpu.RECIPE_ARGS) * len(gpu.ENGINES) * len(gpu.MODES)
        return f"""## {TITLES["gpu"]}

Not measured: no GPU in the runs so far. On a machine with CUDA GPUs (torch built for CUDA, e.g.
`make install TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"`):

    {command}

It adds this section and leaves the others as they are. In bf16, one process per GPU, it measures
{len(gpu.RECIPE_ARGS)} recipes x {len(gpu.ENGINES)} engines ({engines}) x eager and compiled
(`compile=true`, inductor, `compile_mode=default`): {cells} cells, samples/s, model FLOPs utilisation (over the
GPU's dense bf16 peak, found by its name) and time per step of each, and for each compiled cell its
steps/s over eager's and what compiling cost. Recipes (bench/gpu.py RECIPE_ARGS, larger than the CPU
defaults), accumulation {gpu.ACCUMULATION}:

{recipes}

One job per recipe and engine (a process holds one engine), in which an eager and a compiled trainer
take turns on the same steps: one step with its model FLOPs counted (`disttrain.speed.flops`, as the
trainer counts them for its MFU), {gpu.WARMUP_STEPS} warm-up steps (the compilation: its graphs and seconds reported
apart), then {gpu.REPS} repetitions ({gpu.QUICK_REPS} with `--quick`) of {gpu.STEPS_PER_REP} timed steps per trainer. A job whose
compiled trainer fails runs again eager only.

Checked on CPU only (`--cpu-smoke`: tiny models, compiled with aot_eager), where {GPU_SMOKE_FAILURES}
"""
    rows = []
    for key, r in g.items():
        recipe, engine = key.split("/")
        cell = f"{recipe} | {GPU_ENGINES.get(engine, engine)}"
        if "error" in r:
            rows.append(f"| {cell} | both | failed: `{r['error'][-200:]}` | | | | |")
            continue
        # Results from before compiled cells were measured hold eager's list alone.
        seconds = r["seconds"] if isinstance(r["seconds"], dict) else {"eager": r["seconds"]}
        for mode, times in seconds.items():
            per_step = spread([t / r["steps_per_rep"] for t in times])
            samples = r["samples_per_step"] / per_step["median"]
            mfu = "n/a"
            if r["flops_per_step"] and r["peak_flops_per_gpu"]:
                peak = r["peak_flops_per_gpu"] * r["world_size"]
                mfu = f"{r['flops_per_step'] / per_step['median'] / peak:.1%}"
            versus, compilation = "", ""
            if mode == "compiled":
                if "eager" in seconds:
                    versus = _x(_speed_ratio(times, seconds["eager"]))
                runs = r.get("compile") or []
                if runs:
                    compilation = (
                        f"{runs[0]['warmup_graphs']} graph(s), {spread([c['warmup_compile_s'] for c in runs])['median']:.1f} s "
                        f"({runs[0]['backend']}); {max(c['timed_graphs'] for c in runs)} in timed blocks"
                    )
            rows.append(f"| {cell} | {mode} | {samples:,.0f} | {mfu} | {_ms(per_step)} | {versus} | {compilation} |")
        if "compiled_error" in r:
            rows.append(f"| {cell} | compiled | failed: `{r['compiled_error'][-200:]}` | | | | |")
    measured = next((r for r in g.values() if "device" in r), {})
    return f"""## {TITLES["gpu"]}

{measured.get("device", "unknown")}, {measured.get("world_size", "?")} process(es), one per GPU; bf16; `{command}` (bench/gpu.py).
One job per recipe and engine, engines in turn; in each, the eager and the compiled trainer take turns
on the same steps ({measured.get("steps_per_rep", "?")} per block) after {measured.get("warmup_steps", "?")} untimed steps, the first of them FLOP-counted,
the others the compilation's. MFU: model FLOPs of one step (as the trainer counts them), per second,
over the GPUs' dense bf16 peak. Compiled / eager: steps/s, repetition by repetition. Compilation: rank 0's
graphs and seconds in the warm-up steps (median over jobs), and graphs compiled again inside the
timed blocks (0 when the timed figures hold no compilation).

| recipe | engine | mode | samples/s | MFU | time per step | compiled / eager | compilation |
|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}
"""


def _data(d: dict[str, Any]) -> str:
    s, c, steps = d["seconds"], d["cpu_seconds"], d["steps_per_rep"]
    rows = []
    for side, workers in d["workers"].items():
        speed = "1" if side == "memory" else _x(_speed_ratio(s[side], s["memory"]))
        cpu = "1" if side == "memory" else _x(_speed_ratio(c[side], c["memory"]))
        waits = spread([w / steps for w in d["data_wait_seconds"][side]])
        rows.append(
            f"| {side} | {workers} | {speed} | {cpu} | {_pct(_data_wait_share(d, side))} | {_ms(waits)} "
            f"| {_ms(spread([t / steps for t in s[side]]))} |"
        )
    micro = d["micro_batch"]
    memory_micro = spread([t / (steps * d["accumulation"]) for t in c["memory"]])["median"]
    threads = f"{d['threads']} compute thread{'s' if d['threads'] > 1 else ''}"
    return f"""## {TITLES["data"]}

The template's trainer fed by its DataLoader (`data.num_workers`; `data.prefetch_factor=0`: two
windows ahead) against the same trainer fed from memory, on a data set with a real per-sample cost
(`bench/loading.py`): {d["num_train"]} images of 3x{d["image_size"]}x{d["image_size"]} pixels stored as PNG stores them (Sub filter, then
deflate; {d["compressed_ratio"]:.0%} of the raw size). Loading one inflates it, undoes the filter and augments it
(random resized crop to {d["crop"]}x{d["crop"]} with antialiasing, flip, colour jitter): {d["load_ms_per_sample"]:.2f} ms per sample inline
here, {d["load_ms_per_sample"] * micro:.0f} ms per micro-batch of {micro}, against {memory_micro * 1e3:.0f} ms of CPU to compute one (forward and
backward of a {d["parameters"] / 1e3:.0f} k-parameter CNN). `memory` is the same trainer with the samples decoded
and augmented once, up front, and sliced by the recipe's `train_batch`: training with free loading.
`memory_copy` is a second, identical one: its figures show how far this run's noise alone moves a ratio.

World size {d["world_size"]}, {threads} in the training process, {d["cores"]} cores: the second core is left
to the workers. A second compute thread would compete with them for it, and two training processes
would leave no core free, so that no worker count could hide any loading. Accumulation
{d["accumulation"]}, micro-batch {micro}. {d["reps"]} repetitions; in each, every side runs {d["lead_in_steps"]} untimed steps (its workers'
head start of two windows, gained while the other sides ran, spent) then {steps} timed ones, sides in a
shuffled order, all on the same steps. Each side is its own trainer, whose loader and workers live
through the job as they live through a run in `fit`. Speed: steps/s over `memory`'s, per
repetition, by wall time (the target's measure) and by the training process's CPU time (the
workers' own is not in it: this shows the loading leaving the training process). Data wait:
`StepResult.data_wait_s` summed over the timed steps, as a share of their wall time, and per step.

| side | workers | speed vs memory (wall) | (training process CPU) | data-wait share | data wait per step | time per step |
|---|---|---|---|---|---|---|
{chr(10).join(rows)}

Target: with workers, at least {DATA_TARGET}x of `memory` and a data-wait share under {DATA_WAIT_TARGET:.0%}. Workers hide
the loading only on a core the training process does not use: other processes on the machine take
that core from them (data wait) or, when the workers keep up, take the training process's core
more often (wall time lost with no data wait, and a CPU-time ratio near 1).
"""


SHARDING_SIDES = {
    "ddp": "DDP",
    "zero2": "DeepSpeed ZeRO 2",
    "fsdp": "FSDP2, one reduce-scatter per window",
    "fsdp_every": "FSDP2, `fsdp.sync_every_micro_batch`",
}


def _sharding(sh: dict[str, Any]) -> str:
    # Results written before world 4 was measured hold world 2's sides at the top level.
    worlds = sh.get("worlds") or {"2": {"sides": sh["sides"]}}
    rows = []
    for world, measured in sorted(worlds.items(), key=lambda kv: int(kv[0])):
        sides, base = measured["sides"], measured["sides"]["ddp"]
        rows += [
            f"| {world} | {SHARDING_SIDES[name]} | {d['process_peak_mib']['median']:.0f} | "
            f"{d['process_peak_mib']['median'] / base['process_peak_mib']['median']:.2f}x | "
            f"{d['training_peak_mib']['median']:.0f} | "
            f"{d['training_peak_mib']['median'] / base['training_peak_mib']['median']:.2f}x | "
            f"{_ms(d['step_seconds'])} |"
            for name, d in sides.items()
        ]
    sizes = sorted(int(w) for w in worlds)
    floors = ", ".join(f"1/{w} = {1 / w:.2f}x at world {w}" for w in sizes)
    crowded = [w for w in sizes if w > sh.get("cores", 2)]
    oversubscribed = (
        f"\n\nAt world {', '.join(map(str, crowded))} the {sh.get('cores', 2)}-core machine runs more processes than it has "
        "cores:\nthose step times are an oversubscribed CPU's (compare sides within a world size, not across);\n"
        "memory is not affected."
        if crowded
        else ""
    )
    return f"""## {TITLES["sharding"]}

seq2seq at width 384 ({sh["parameters"] / 1e6:.1f} M parameters, AdamW) at world size {" and ".join(map(str, sizes))}, accumulation
{sh["accumulation"]}, micro-batch {sh["micro_batch"]} per process at every world size (the global batch grows with the world).
Each side in its own job, {sh["repeats"]} job(s) each, world sizes and sides in turn. Peak resident set
(`VmHWM`) of the largest process, reset just before {sh["steps"]} optimizer steps; "training peak" is that
peak minus the resident set before the steps. glibc's mmap threshold is fixed
(`MALLOC_MMAP_THRESHOLD_={sh["MALLOC_MMAP_THRESHOLD_"]}`) so that freed tensors leave the resident set.

"vs DDP": against DDP at the same world size, which keeps the whole state in every process. The
physical floor for sharded state (parameters, gradients and Adam moments: {16 * sh["parameters"] / 2**20:.0f} MiB in float32)
is 1/world of DDP's ({floors});
activations, gathered parameters, communication buffers and the process's fixed few hundred MiB
are not sharded, so the ratios stay above it. Step time: the slowest process, steps after the
first.{oversubscribed}

| world | side | process peak, MiB | vs DDP | training peak, MiB | vs DDP | time per step |
|---|---|---|---|---|---|---|
{chr(10).join(rows)}
"""


def _speed(result: dict[str, Any]) -> str:
    t, m = result["throughput"], result["memory"]
    rows = [
        f"## {TITLES['speed']}",
        "",
        f"One process, the 1 M-parameter seq2seq model, `compile_backend={t['backend']}`: {t['graphs']} graph(s) "
        f"compiled in {t['compile_s']:.1f} s during the 3 warm-up steps ({t['warmup_wall_s']:.1f} s in all), "
        "not in the timed blocks.",
        "",
        "| | steps/s (median, IQR) |",
        "| --- | --- |",
    ]
    for name, s in t["steps_per_s"].items():
        rows.append(f"| {name} | {s['median']:.2f} ({s['q1']:.2f}-{s['q3']:.2f}) |")
    rows += ["", *_causal_lm_speed(result.get("causal_lm"))]
    rows += [
        "",
        f"Peak training memory, global batch {m['global_batch']} (MiB):",
        "",
        "| setting | MiB |",
        "| --- | --- |",
    ]
    for name, s in m["training_peak_mib"].items():
        rows.append(f"| {name} | {s['median']:.1f} |")
    return "\n".join(rows) + "\n"


def _causal_lm_speed(c: dict[str, Any] | None) -> list[str]:
    if c is None:
        return ["causal_lm: not measured in this run (measured since the section added it)."]
    if "skipped" in c or "error" in c:
        return [f"causal_lm: not measured: {c.get('skipped') or c.get('error')}"]
    rows = [
        f"causal_lm (GPT-2 from its config, 4 layers of width 128, windows of 128 bytes, micro-batch 8, one "
        f"process, `compile_backend={c['backend']}`): {c['graphs']} graph(s) compiled in {c['compile_s']:.1f} s "
        "during the warm-up steps.",
        "",
        "| | steps/s (median, IQR) |",
        "| --- | --- |",
    ]
    for name, s in c["steps_per_s"].items():
        rows.append(f"| {name} | {s['median']:.2f} ({s['q1']:.2f}-{s['q3']:.2f}) |")
    return rows


def _checkpoint(c: dict[str, Any]) -> str:
    rows = [
        f"| {name} | {r['parameters'] / 1e6:.1f} M | {r['checkpoint_mib']:.0f} | {_ms(r['block_none'])} | "
        f"{_ms(r['in_step']['sync'])} | {_ms(r['in_step']['async'])} | {r['in_step_ratio']:.2f}x | "
        f"{_ms(r['lost']['sync'])} | {_ms(r['lost']['async'])} | {r['lost_ratio']:.2f}x |"
        for name, r in c["runs"].items()
    ]
    return f"""## {TITLES["checkpoint"]}

`checkpoint_async=true` against the synchronous write, 2 processes (`bench/checkpointing.py`). Each job
builds the trainer once and runs blocks of {c["steps_per_block"]} optimizer steps, the sides in turn: no
checkpoint, a synchronous one, one in the background, each after step {c["checkpoint_after"] + 1} of its block; a block ends
once its checkpoint is published. "In the step": the trainer's call (what the next step waits for:
the space check, gathering the full weights, copying the state). "Lost": the block minus the same
repetition's block without a checkpoint, the slowest process. On this 2-core machine both
processes train on both cores, so the background thread's serializing, checksums and writes take
CPU from training: "lost" shrinks less than "in the step". Where training runs on GPUs, the host's
cores are free for it. FSDP2 copies its shards in the step; the writing thread gathers the full
weights for `models/*.safetensors`. What stays in the step whatever the model's size (the space
check, two collectives, making the directory: about 25 ms here) is most of the 1 M model's stall.

| engine/model | parameters | checkpoint, MiB | block without | in the step, sync | background | ratio | lost, sync | background | ratio |
|---|---|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}
"""
