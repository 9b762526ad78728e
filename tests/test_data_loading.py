"""Data through the DataLoader: the batches, their per-sample randomness and the final weights do not
depend on the number of workers or processes, nor on a resume; data the plan cannot index is refused."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import IterableDataset

from disttrain.config import ConfigError
from disttrain.data.loader import plan_loader
from disttrain.data.samples import sample_seed
from disttrain.data.windows import WindowSampler
from disttrain.preflight import resolve_config
from disttrain.recipe import build_recipe
from disttrain.trainer import Trainer
from tests.launcher import accelerate, launch

AUGMENTED = ["recipe=tests.fixture_recipes.augmented", "tracker=none", "progress_bar=false"]
STEPS = 6  # 60 samples in global batches of 24: epochs of 3 steps, each ending in a window of 12


def drawn_samples(workers: int, world: int, start: int = 0) -> dict[tuple[int, int], torch.Tensor]:
    """(step, dataset index) -> the augmented input each process's loader gave it, over all processes."""
    recipe = build_recipe(resolve_config([*AUGMENTED, "micro_batch_size=2"], world_size=world))
    windows = WindowSampler(recipe.num_train, 24, 2, seed=0)
    drawn = {}
    for rank in range(world):
        loader = plan_loader(recipe.phases, windows, start, STEPS, rank, world, workers, 0, False, 24 // (2 * world))
        for loaded in loader:
            batch = loaded.batch
            for index, x in zip(batch["index"].tolist(), batch["x"], strict=True):
                key = (loaded.request.step, index)
                if not loaded.request.plan.stand_in:
                    assert key not in drawn, f"sample {index} loaded twice in step {key[0]}"
                    drawn[key] = x
    return drawn


def test_per_sample_randomness_is_the_same_for_any_world_worker_count_and_resume():
    reference = drawn_samples(workers=0, world=1)
    assert len(reference) == 2 * 60  # every sample once per epoch, the shorter windows included
    for workers, world, start in ((2, 1, 0), (0, 2, 0), (2, 2, 0), (2, 2, 4)):
        other = drawn_samples(workers, world, start)
        expected = {k: v for k, v in reference.items() if k[0] >= start}
        assert other.keys() == expected.keys(), (workers, world, start)
        for key, x in expected.items():
            assert torch.equal(other[key], x), f"sample {key} differs with {workers} workers on {world} processes"
    # A new epoch draws anew: the same sample is augmented differently in epochs 0 and 1.
    first, second = (
        {i: x for (s, i), x in reference.items() if s < 3},
        {i: x for (s, i), x in reference.items() if s >= 3},
    )
    assert all(not torch.equal(first[i], second[i]) for i in first)


def final_weights(tmp_path, name: str, *args: str) -> dict[str, torch.Tensor]:
    cfg = resolve_config(
        [*AUGMENTED, f"steps={STEPS}", f"output_dir={tmp_path}", f"run_name={name}", *args], world_size=1
    )
    trainer = Trainer(cfg)
    try:
        trainer.fit()
    finally:
        trainer.close()
    return load_file(tmp_path / name / "model.safetensors")


def test_workers_give_bit_identical_weights(tmp_path):
    # Dropout draws from the training process's generator: loading samples inline (0 workers) must
    # leave it as it found it, or the two runs would drop different units.
    inline = final_weights(tmp_path, "inline")
    workers = final_weights(tmp_path, "workers", "data.num_workers=2", "data.prefetch_factor=3")
    assert inline.keys() == workers.keys()
    for name, value in inline.items():
        assert torch.equal(value, workers[name]), name


@pytest.mark.slow
def test_two_processes_with_workers_train_like_one(tmp_path):
    # Dropout off: its masks are drawn by each process. The augmentation stays on.
    one = final_weights(tmp_path, "one", "augmented.dropout=0")
    # Under a TMPDIR too long for a socket path (a SLURM job's can be): a worker handing a batch over
    # listens on a socket there, failed, and dropped the batch; this run waited for it forever
    # (disttrain.unix_sockets). conftest restores TMPDIR after the test.
    long = tmp_path / ("t" * max(1, 100 - len(str(tmp_path))))
    long.mkdir()
    os.environ["TMPDIR"] = str(long)
    launch(
        accelerate(),
        *AUGMENTED,
        f"steps={STEPS}",
        f"output_dir={tmp_path}",
        "run_name=two",
        "augmented.dropout=0",
        "data.num_workers=2",
    )
    two = load_file(tmp_path / "two" / "model.safetensors")
    for name, value in one.items():
        torch.testing.assert_close(two[name], value, rtol=1e-5, atol=1e-6)


def test_an_iterable_dataset_is_refused_with_the_map_style_way():
    recipe = build_recipe(resolve_config(AUGMENTED, world_size=1))

    class Stream(IterableDataset):
        def __iter__(self):
            yield from range(3)

    recipe.train_dataset = Stream()
    with pytest.raises(ConfigError, match=r"IterableDataset.*map-style Dataset"):
        recipe.check_data()


def test_sample_seed_is_known_only_while_a_sample_loads():
    with pytest.raises(RuntimeError, match="inside __getitem__"):
        sample_seed()


def test_loader_keys_are_checked_before_launch():
    with pytest.raises(ConfigError, match=r"data\.prefetch_factor=4 needs data\.num_workers > 0"):
        resolve_config([*AUGMENTED, "data.prefetch_factor=4"], world_size=1)
    with pytest.raises(ConfigError, match="workers already live for the whole run"):
        resolve_config([*AUGMENTED, "data.persistent_workers=true"], world_size=1)
    with pytest.raises(ConfigError, match=r"data\.num_workers=-1 must be >= 0"):
        resolve_config([*AUGMENTED, "data.num_workers=-1"], world_size=1)
