"""A Hugging Face `datasets.Dataset` read from a local JSON-lines file is a map-style training set.

`tests/fixture_recipes/hf_datasets.py` puts it in `train_dataset` as a user would. One process and
two processes train it to the same weights, which are those of an independent whole-batch loop
that reads the file with `json` (no `datasets`, no accumulation code), in float64. The file holds
float32 values, so reading it either way gives the same numbers. No network: the Hub is switched
off and the datasets cache lives in the test's temporary directory.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from disttrain.data.windows import WindowSampler
from tests.dist import run_distributed

RECIPE = "recipe=tests.fixture_recipes.hf_datasets"
STEPS = 4  # one epoch is 3 steps below: the 4th starts the next epoch
GLOBAL_BATCH, MICRO_BATCH, NUM_EVAL, FEATURES = 16, 4, 8, 3
# Training rows per case: the 3rd window full, shorter, or shorter than the number of processes.
CASES = {"full": 48, "short": 40, "tiny": 33}
LR, MOMENTUM, CLIP = 0.05, 0.9, 0.5  # the fixture's defaults; the clip bites on the first steps


def write_rows(path: str, count: int, seed: int) -> None:
    """`count` JSON lines {"x": [...], "y": ...} of float32 values (exact in float64 as well)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(count, FEATURES, generator=g)
    y = torch.sin(x @ torch.tensor([1.5, -2.0, 0.5])) + 0.1 * torch.randn(count, generator=g)
    with open(path, "w") as f:
        for xi, yi in zip(x.tolist(), y.tolist(), strict=True):
            f.write(json.dumps({"x": xi, "y": yi}) + "\n")


def train_cases(files: dict[str, str], output_dir: str) -> dict[str, dict]:
    """On every rank of the group: each case trained as `train.py` trains it (`Trainer.fit`), in
    float64; the weights before and after."""
    from accelerate.utils import set_seed

    from disttrain.config import world_size_from_env
    from disttrain.preflight import resolve_config
    from disttrain.recipe import build_recipe
    from disttrain.trainer import Trainer
    from tests.reference import named_params

    out = {}
    for case, path in files.items():
        cfg = resolve_config(
            [
                RECIPE,
                f"hf_datasets.data_file={path}",
                f"hf_datasets.num_eval={NUM_EVAL}",
                f"steps={STEPS}",
                f"global_batch_size={GLOBAL_BATCH}",
                f"micro_batch_size={MICRO_BATCH}",
                f"output_dir={output_dir}",
                f"run_name={case}-w{world_size_from_env()}",
                "tracker=none",
                "progress_bar=false",
                "checkpoint_every=0",
                "resume=never",
                # inline on 1 process, a (forked) DataLoader worker on each of 2: the data set must not care
                f"data.num_workers={world_size_from_env() - 1}",
            ]
        )
        set_seed(cfg.seed)
        recipe = build_recipe(cfg)
        assert type(recipe.train_dataset).__module__.startswith("datasets."), type(recipe.train_dataset)
        recipe.models["model"].double()
        initial = named_params(recipe.models)
        trainer = Trainer(cfg, recipe)
        trainer.fit()
        out[case] = {"initial": initial, "final": named_params(trainer.recipe.models)}
    return out


def reference(path: str, initial: dict[str, torch.Tensor], seed: int = 0) -> dict[str, torch.Tensor]:
    """Plain PyTorch on one process: the file read with `json`, torch's mean loss over each whole
    global batch, clip, SGD with momentum. Only the data order (the sampler) is shared."""
    with open(path) as f:
        rows = [json.loads(line) for line in f]
    x = torch.tensor([r["x"] for r in rows], dtype=torch.float64)[:-NUM_EVAL]
    y = torch.tensor([r["y"] for r in rows], dtype=torch.float64)[:-NUM_EVAL]
    hidden = initial["model.0.weight"].shape[0]
    model = nn.Sequential(nn.Linear(FEATURES, hidden), nn.Tanh(), nn.Linear(hidden, 1)).double()
    model.load_state_dict({k.removeprefix("model."): v for k, v in initial.items()})
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    sampler = WindowSampler(len(x), GLOBAL_BATCH, MICRO_BATCH, seed)
    for step in range(STEPS):
        batch = sampler.global_batch(step)
        F.mse_loss(model(x[batch]).squeeze(-1), y[batch]).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return {f"model.{k}": v.detach() for k, v in model.named_parameters()}


@pytest.mark.slow
def test_a_local_datasets_dataset_trains_alike_on_one_and_two_processes(tmp_path):
    cache = tmp_path / "hf-cache"
    # Read by `datasets` when the spawned ranks import it: offline, and every file it writes in here.
    os.environ.update(
        HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", HF_HOME=str(cache), HF_DATASETS_CACHE=str(cache / "datasets")
    )
    files = {}
    for i, (case, count) in enumerate(CASES.items()):
        files[case] = str(tmp_path / f"{case}.jsonl")
        write_rows(files[case], count + NUM_EVAL, seed=i)

    one = run_distributed(train_cases, 1, files, str(tmp_path / "runs"))[0]
    two = run_distributed(train_cases, 2, files, str(tmp_path / "runs"))

    assert any((cache / "datasets").rglob("*.arrow")), "the datasets cache is the test's own"
    for case, path in files.items():
        expected = reference(path, one[case]["initial"])
        runs = {"1 process": one[case], **{f"2 processes, rank {r}": ranks[case] for r, ranks in enumerate(two)}}
        for run, got in runs.items():
            assert got["final"].keys() == expected.keys()
            for name in expected:
                what = f"{case}, {run}, {name}"
                torch.testing.assert_close(got["initial"][name], one[case]["initial"][name], rtol=0, atol=0)
                # float64 throughout: the bounds of tests/test_equivalence.py
                for target, against in ((expected, "the reference"), (one[case]["final"], "1 process")):
                    torch.testing.assert_close(
                        got["final"][name],
                        target[name],
                        rtol=1e-9,
                        atol=1e-11,
                        msg=lambda m, w=f"{what} vs {against}": f"{w}: {m}",
                    )
        moved = max(float((one[case]["final"][n] - one[case]["initial"][n]).abs().max()) for n in expected)
        assert moved > 1e-3, "the weights trained"
