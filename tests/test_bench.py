"""The benchmark harness still runs against the current trainer: one repetition of the loop
comparison on the tiny model, 2 processes, and of the data-loading comparison, and their reports.
The raw results of a run of some sections merge into those of earlier runs, and the report says
where each section was measured. Nothing about time is asserted."""

from __future__ import annotations

import json
import sys

import pytest

from bench.harness import run_job
from bench.report import render

ENVIRONMENT = {
    "date": "today",
    "commit": "test",
    "cpu": "cpu",
    "cores": 2,
    "memory_gib": 1,
    "os": "os",
    "gpus": [],
    "python": "3",
    "versions": {p: "0" for p in ("torch", "accelerate", "deepspeed", "lightning")},
}


@pytest.mark.slow
def test_loop_comparison_runs_one_repetition_and_renders():
    result = run_job(
        "bench.loop", ["--workload", "tiny", "--reps", "1", "--quick", "--steps-per-rep", "2"], timeout=120
    )

    assert result["world_size"] == 2 and result["accumulation"] == 8
    assert result["parameters"] > 0
    assert set(result["seconds"]) == {"template", "template_unwatched", "hand", "accelerate", "hand_copy"}
    assert all(len(times) == 1 and times[0] > 0 for times in result["seconds"].values())
    assert result["progress"]["records_per_step"] > 0 and result["progress"]["seconds_per_record"] > 0

    report = render({"environment": ENVIRONMENT, "quick": True, "results": {"loop": {"tiny": result}}})
    assert "| tiny (" in report and "Template's added wall time per micro-step" in report
    assert "| tiny (" in report and "| template_unwatched |" in report


@pytest.mark.slow
def test_data_comparison_runs_one_repetition_and_renders():
    args = ["--reps", "1", "--quick", "--steps-per-rep", "1", "--workers", "0,1", "--num-train", "64"]
    result = run_job("bench.loading", args, nproc=1, timeout=120)

    assert result["world_size"] == 1 and result["threads"] == 1
    assert set(result["seconds"]) == {"memory", "memory_copy", "workers_0", "workers_1"}
    assert all(len(times) == 1 and times[0] > 0 for times in result["seconds"].values())
    assert all(len(waits) == 1 and waits[0] >= 0 for waits in result["data_wait_seconds"].values())

    report = render({"environment": ENVIRONMENT, "quick": True, "results": {"data": result}})
    assert "## 7. Data loading" in report and "| workers_1 | 1 |" in report
    assert "Trainer with 1 DataLoader worker / the same trainer fed from memory" in report


def one(value: float) -> dict[str, float]:
    return {"median": value, "q1": value, "q3": value, "n": 1}


def sharding_result(scale: float = 1.0) -> dict:
    from bench.sharding import SIDES

    def side(peak: float, training: float, seconds: float) -> dict:
        return {"process_peak_mib": one(peak), "training_peak_mib": one(training), "step_seconds": one(seconds)}

    result = {"workload": [], "accumulation": 4, "micro_batch": 6, "repeats": 1, "steps": 3, "parameters": 8.3e6}
    result["MALLOC_MMAP_THRESHOLD_"] = "65536"
    result["worlds"] = {
        str(world): {
            "sides": {
                name: side(scale * (500 - 5 * i * world), 160 - 10 * i * world, 1 + i) for i, name in enumerate(SIDES)
            }
        }
        for world in (2, 4)
    }
    return result


def test_sharding_report_states_each_side_against_ddp_of_its_world_size():
    report = render({"environment": ENVIRONMENT, "quick": True, "results": {"sharding": sharding_result()}})
    assert "## 8. Sharding: DDP, ZeRO 2, FSDP2" in report
    assert (
        "| 2 | FSDP2, `fsdp.sync_every_micro_batch` | 470 | 0.94x | 100 | 0.62x | 4000.00 ms (4000.00 to 4000.00) |"
        in report
    )
    assert (
        "| 4 | FSDP2, `fsdp.sync_every_micro_batch` | 440 | 0.88x | 40 | 0.25x | 4000.00 ms (4000.00 to 4000.00) |"
        in report
    )
    assert "1/2 = 0.50x at world 2, 1/4 = 0.25x at world 4" in report


H200 = {**ENVIRONMENT, "date": "later", "commit": "gpu", "cpu": "Xeon", "cores": 16, "gpus": ["NVIDIA H200"]}


def gpu_result() -> dict:
    cell = {"recipe": "seq2seq", "engine": "fsdp2", "modes": ["eager", "compiled"], "device": "NVIDIA H200"}
    cell.update(world_size=1, samples_per_step=128, flops_per_step=1e12, peak_flops_per_gpu=989e12)
    cell.update(steps_per_rep=10, warmup_steps=4, seconds={"eager": [1.0], "compiled": [0.5]})
    cell["compile"] = [{"backend": "inductor", "warmup_graphs": 2, "warmup_compile_s": 30.0, "timed_graphs": 0}]
    return {"seq2seq/fsdp2": cell}


def test_a_run_of_some_sections_replaces_those_and_keeps_the_others():
    from bench.results import merge

    # A results file of one run (one environment for all its sections), as written before sections kept their own.
    first = {
        "environment": ENVIRONMENT,
        "quick": False,
        "results": {"sharding": sharding_result(), "gpu": {"skipped": "no GPU in this run"}, "memory": {"m": 1}},
        "errors": {"speed": "RuntimeError: no compiler"},
        "seconds": {"sharding": 60.0, "gpu": 0.0, "memory": 5.0, "speed": 1.0},
    }
    rerun = {
        "environments": {"gpu": H200, "speed": H200},
        "quick": {"gpu": False, "speed": False},
        "results": {"gpu": gpu_result(), "speed": {"s": 2}},
        "seconds": {"gpu": 300.0, "speed": 30.0},
    }
    merged = merge(first, rerun)

    assert merged["results"]["sharding"] == first["results"]["sharding"]  # untouched, with where it was measured
    assert merged["environments"]["sharding"] == ENVIRONMENT and merged["seconds"]["sharding"] == 60.0
    assert merged["results"]["gpu"] == gpu_result() and merged["environments"]["gpu"] == H200
    assert merged["results"]["speed"] == {"s": 2} and "speed" not in merged["errors"]  # succeeds now: error gone

    # Run again where there is no GPU, and where the memory section fails: neither loses its figures.
    elsewhere = {**ENVIRONMENT, "date": "last"}
    again = {
        "environments": {"gpu": elsewhere, "memory": elsewhere},
        "quick": {"gpu": False, "memory": False},
        "results": {"gpu": {"skipped": "no GPU in this run"}},
        "errors": {"memory": "RuntimeError: out of memory"},
        "seconds": {"gpu": 0.0, "memory": 3.0},
    }
    merged = merge(merged, again)
    assert merged["results"]["gpu"] == gpu_result() and merged["environments"]["gpu"] == H200
    assert merged["results"]["memory"] == {"m": 1} and merged["environments"]["memory"] == ENVIRONMENT
    assert merged["errors"] == {"memory": "RuntimeError: out of memory"}


def test_only_gpu_adds_its_section_and_the_report_says_where_each_was_measured(tmp_path, monkeypatch):
    import bench.__main__ as bench_main

    results_file, report_file = tmp_path / "BENCHMARKS.json", tmp_path / "BENCHMARKS.md"
    earlier = {"environment": ENVIRONMENT, "quick": False, "results": {"sharding": sharding_result()}}
    results_file.write_text(json.dumps(earlier))
    monkeypatch.setattr(bench_main, "sections", lambda quick: {"gpu": gpu_result, "sharding": pytest.fail})
    monkeypatch.setattr(bench_main, "environment", lambda: dict(H200))
    argv = ["bench", "--only", "gpu", "--results", str(results_file), "--output", str(report_file)]
    monkeypatch.setattr(sys, "argv", argv)
    bench_main.main()

    saved = json.loads(results_file.read_text())
    assert saved["results"]["sharding"] == sharding_result() and saved["environments"]["sharding"] == ENVIRONMENT
    assert saved["results"]["gpu"] == gpu_result() and saved["environments"]["gpu"]["gpus"] == ["NVIDIA H200"]
    assert len(saved["environments"]["gpu"]["load_average_end"]) == 3

    report = report_file.read_text()
    assert "**Setup 1**: gpu" in report and "**Setup 2**: sharding" in report
    assert "*Measured on today, commit `test`, on cpu, 2 cores (setup 2 above).*" in report
    assert "| seq2seq | FSDP2 | compiled | 2,560 | 2.0% | 50.00 ms (50.00 to 50.00) | 2.000x (2.000–2.000) |" in report
    assert "| seq2seq | FSDP2 | eager | 1,280 | 1.0% |" in report
    assert "| 4 | DDP | 500 | 1.00x |" in report

    # --render rewrites the same report from the saved results alone.
    report_file.unlink()
    monkeypatch.setattr(sys, "argv", ["bench", "--render", str(results_file), "--output", str(report_file)])
    bench_main.main()
    assert report_file.read_text() == report
