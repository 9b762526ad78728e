"""The benchmark harness still runs against the current trainer: one repetition of the loop
comparison on the tiny model, 2 processes, and of the data-loading comparison, and their reports.
Nothing about time is asserted."""

from __future__ import annotations

import pytest

from bench.harness import run_job
from bench.report import render

pytestmark = pytest.mark.slow

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


def test_loop_comparison_runs_one_repetition_and_renders():
    result = run_job(
        "bench.loop", ["--workload", "tiny", "--reps", "1", "--quick", "--steps-per-rep", "2"], timeout=120
    )

    assert result["world_size"] == 2 and result["accumulation"] == 8
    assert result["parameters"] > 0
    assert set(result["seconds"]) == {"template", "hand", "accelerate", "hand_copy"}
    assert all(len(times) == 1 and times[0] > 0 for times in result["seconds"].values())

    report = render({"environment": ENVIRONMENT, "quick": True, "results": {"loop": {"tiny": result}}})
    assert "| tiny (" in report and "Template's added wall time per micro-step" in report


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


def test_sharding_report_states_each_side_against_ddp():
    from bench.sharding import SIDES

    def side(peak: float, training: float, seconds: float) -> dict:
        one = lambda v: {"median": v, "q1": v, "q3": v, "n": 1}  # noqa: E731
        return {"process_peak_mib": one(peak), "training_peak_mib": one(training), "step_seconds": one(seconds)}

    result = {"workload": [], "accumulation": 4, "micro_batch": 6, "repeats": 1, "steps": 3, "parameters": 8.3e6}
    result["MALLOC_MMAP_THRESHOLD_"] = "65536"
    result["sides"] = {name: side(500 - 10 * i, 160 - 20 * i, 1 + i) for i, name in enumerate(SIDES)}
    report = render({"environment": ENVIRONMENT, "quick": True, "results": {"sharding": result}})
    assert "## 8. Sharding: DDP, ZeRO 2, FSDP2" in report
    assert (
        "| FSDP2, `fsdp.sync_every_micro_batch` | 470 | 0.94x | 100 | 0.62x | 4000.00 ms (4000.00 to 4000.00) |"
        in report
    )
