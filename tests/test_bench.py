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
