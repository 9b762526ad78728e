"""The data order: a function of seed and step, the same union of samples on any world size."""

from __future__ import annotations

import pytest

from disttrain.data.windows import WindowSampler, split_window


def union(sampler: WindowSampler, step: int, world_size: int) -> list[int]:
    seen = []
    for rank in range(world_size):
        seen += [i for plan in sampler.window(step, rank, world_size) if not plan.stand_in for i in plan.indices]
    return sorted(seen)


@pytest.mark.parametrize(("num_samples", "global_batch", "micro"), [(96, 24, 2), (61, 24, 3), (50, 24, 1), (5, 4, 1)])
def test_every_world_size_sees_the_global_batch_of_each_step(num_samples, global_batch, micro):
    sampler = WindowSampler(num_samples, global_batch, micro, seed=3)
    for step in range(3 * sampler.steps_per_epoch):
        expected = sorted(sampler.global_batch(step))
        for world_size in (1, 2, 4):
            assert union(sampler, step, world_size) == expected, (step, world_size)


def test_epochs_cover_the_dataset_once_in_a_new_order():
    sampler = WindowSampler(50, 16, 4, seed=0)
    assert sampler.steps_per_epoch == 4
    epoch0 = [i for s in range(4) for i in sampler.global_batch(s)]
    epoch1 = [i for s in range(4, 8) for i in sampler.global_batch(s)]
    assert sorted(epoch0) == sorted(epoch1) == list(range(50))
    assert epoch0 != epoch1
    assert [len(sampler.global_batch(s)) for s in range(4)] == [16, 16, 16, 2]


def test_order_depends_on_seed_not_on_history():
    a, b = WindowSampler(100, 10, 2, seed=1), WindowSampler(100, 10, 2, seed=1)
    late = a.global_batch(37)
    assert [b.global_batch(s) for s in (37,)] == [late]  # no need to replay earlier steps
    assert WindowSampler(100, 10, 2, seed=2).global_batch(37) != late


def test_full_window_gives_every_slot_one_micro_batch():
    plans = split_window(list(range(24)), rank=1, world_size=2, micro_batch_size=4)
    assert [p.indices for p in plans] == [[4, 5, 6, 7], [12, 13, 14, 15], [20, 21, 22, 23]]


def test_short_window_uses_fewer_micro_steps_and_even_slots():
    sizes = [[len(p.indices) for p in split_window(list(range(13)), r, 4, 3)] for r in range(4)]
    # 13 samples in 2 micro-steps x 4 processes: slot sizes differ by at most one, none exceeds 3,
    # and every process runs the same number of micro-steps.
    assert sizes == [[2, 2], [2, 1], [2, 1], [2, 1]]


def test_process_without_samples_gets_a_stand_in():
    plans = [split_window([7, 8, 9], r, 4, 2) for r in range(4)]
    assert [p[0].stand_in for p in plans] == [False, False, False, True]
    assert plans[3][0].indices == [7]  # a real sample to run through the model, weighted 0
