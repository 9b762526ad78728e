"""Data loading: a data set with a real per-sample cost, fed to the template's trainer through its
DataLoader with and without workers, against the same trainer fed from memory.

The data set holds images as PNG stores them (rows through PNG's Sub filter, then deflate, here
with the stdlib's zlib); loading a sample inflates it, undoes the filter and augments it (random
resized crop with antialiasing, flip, colour jitter, normalisation): about 1 ms of one core. The
model is a small CNN whose forward and backward of a micro-batch take about three times as long as
loading it, so that one worker can keep ahead of the compute.

The sides, taking turns in one process on the same optimizer steps (each its own trainer, built
alike):

- `memory`: the samples decoded and augmented once, up front; `train_batch` slices them. The
  in-memory loop: what training would cost if loading were free. `memory_copy`: the same again,
  whose ratio to `memory` is the noise floor of the run.
- `workers_0`: the trainer loading inline (`data.num_workers=0`): each window waits for its loads.
- `workers_N`: N DataLoader workers loading the next windows while this one computes.

One training process, one compute thread (`torch.set_num_threads(1)`, as the job's
OMP_NUM_THREADS=1 already asks): on a 2-core machine that leaves the second core to the workers.
A second compute thread would compete with them for it (tried with `--threads 2` on a shared
2-core machine: every side, `memory` included, ran several times slower per step, its two threads
waiting on each other whenever another process held a core), and two training processes would
leave no core free at all, so that no worker count could hide any loading.

Run by `python -m bench` (one job); by hand: `torchrun --nproc_per_node 1 -m bench.loading --out data.json`.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import statistics
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from bench.harness import (
    finish,
    job_parser,
    parameter_count,
    quiet_args,
    scratch_dir,
    shuffled,
    timed,
    write_result,
)
from disttrain.config import Config as RunConfig
from disttrain.config import OptimizerConfig, at_least, lr_multiplier, section, setting, world_size_from_env
from disttrain.data.samples import load_samples
from disttrain.optim import build_group
from disttrain.preflight import resolve_config
from disttrain.recipe import Recipe
from disttrain.trainer import Trainer

RECIPE = "bench.loading"
SECTION = RECIPE.rsplit(".", 1)[1]

MICRO_BATCH = 16
ACCUMULATION = 4
WORKERS = (0, 1, 2)
THREADS = 1  # compute threads of the training process (see the module's docstring)
STEPS_PER_REP = 3  # timed optimizer steps per side and repetition: well under a second each
LEAD_IN = 2  # untimed steps before each timed block: the DataLoader's two windows ahead (see below)
CLASSES = 10

RUN_DEFAULTS = {"steps": 40, "global_batch_size": MICRO_BATCH * ACCUMULATION, "micro_batch_size": MICRO_BATCH}


@dataclass
class Config:
    num_train: int = setting(384, "training images, generated from the seed")
    num_eval: int = setting(64, "held-out images")
    image_size: int = setting(160, "side of the stored images, pixels (3 channels)")
    crop: int = setting(48, "side of the augmented crop the model sees")
    width: int = setting(32, "channels of the CNN's first convolution (doubled twice)")
    in_memory: bool = setting(False, "decode and augment every sample once, up front, and slice them (no loading)")
    optimizer: OptimizerConfig = section(lambda: OptimizerConfig(lr=1e-3, schedule="constant"), "the CNN's optimizer")

    def validate(self, run: RunConfig) -> None:
        k = run.recipe_section
        at_least(f"{k}.num_train", self.num_train, 1)
        at_least(f"{k}.crop", self.crop, 8)
        at_least(f"{k}.image_size", self.image_size, self.crop)
        at_least(f"{k}.width", self.width, 1)
        self.optimizer.validate(f"{k}.optimizer", run.steps)


# --------------------------------------------------------------------------- the data


@functools.cache
def compressed_images(count: int, size: int, seed: int) -> tuple[tuple[bytes, ...], torch.Tensor]:
    """`count` stripe images as PNG would store them, and their classes (the stripes' frequency).

    Cached: the sides of a job build the same data set, and compressing takes a few ms per image.
    """
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, CLASSES, (count,), generator=g)
    angle = torch.rand(count, 1, 1, generator=g) * math.pi
    phase = torch.rand(count, 1, 1, generator=g) * 2 * math.pi
    tint = 0.4 + 0.6 * torch.rand(count, 3, 1, 1, generator=g)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    waves = (xx * angle.cos() + yy * angle.sin()) * (3 + labels.view(-1, 1, 1)) * 2 * math.pi + phase
    # Sensor noise: without it deflate would shrink the images to almost nothing, unlike photographs.
    pixels = 128 + 90 * waves.sin().unsqueeze(1) * tint + 2 * torch.randn(count, 3, size, size, generator=g)
    pixels = pixels.clamp(0, 255).to(torch.uint8)
    filtered = pixels.clone()
    filtered[..., 1:] -= pixels[..., :-1]  # PNG's Sub filter: each byte minus its left neighbour, mod 256
    return tuple(zlib.compress(image.numpy().tobytes(), 1) for image in filtered), labels


def decode(blob: bytes, size: int) -> torch.Tensor:
    """One stored image as floats in [0, 1], shape (3, size, size)."""
    filtered = torch.frombuffer(bytearray(zlib.decompress(blob)), dtype=torch.uint8).view(3, size, size)
    return filtered.cumsum(-1, dtype=torch.int32).remainder_(256).float().div_(255)


def augment(image: torch.Tensor, crop: int) -> torch.Tensor:
    """A random resized crop, flip and colour jitter, drawn from the global generator (the trainer
    seeds it per sample), then normalised."""
    size = image.shape[-1]
    side = int(size * (0.6 + 0.4 * float(torch.rand(()))))
    top, left = torch.randint(0, size - side + 1, (2,)).tolist()
    patch = image[None, :, top : top + side, left : left + side]
    x = F.interpolate(patch, size=(crop, crop), mode="bilinear", antialias=True, align_corners=False)[0]
    if float(torch.rand(())) < 0.5:
        x = x.flip(-1)
    x = x * (0.8 + 0.4 * torch.rand(3, 1, 1)) + 0.1 * (float(torch.rand(())) - 0.5)
    return (x - 0.5) / 0.25


class CompressedImages(Dataset):
    def __init__(self, blobs: tuple[bytes, ...], labels: torch.Tensor, size: int, crop: int):
        self.blobs, self.labels, self.size, self.crop = blobs, labels, size, crop

    def __len__(self) -> int:
        return len(self.blobs)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return augment(decode(self.blobs[i], self.size), self.crop), self.labels[i]


def make_cnn(width: int) -> nn.Sequential:
    w = width
    return nn.Sequential(
        nn.Conv2d(3, w, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(w, 2 * w, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(2 * w, 4 * w, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(4 * w, 4 * w, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4 * w, CLASSES),
    )


class ImagesRecipe(Recipe):
    """Stripe images to classify by frequency, loaded through `train_dataset` or, `in_memory`, from
    tensors decoded and augmented once (each sample's epoch-0 draw) and sliced by `train_batch`."""

    def __init__(self, run: RunConfig):
        c: Config = run.recipe_config
        blobs, labels = compressed_images(c.num_train + c.num_eval, c.image_size, run.seed)
        self.train_dataset = CompressedImages(blobs[: c.num_train], labels[: c.num_train], c.image_size, c.crop)
        held_out = [decode(b, c.image_size)[None] for b in blobs[c.num_train :]]
        self.eval_x = torch.cat(
            [F.interpolate(x, size=(c.crop, c.crop), antialias=True, mode="bilinear") for x in held_out]
        )
        self.eval_x, self.eval_y = (self.eval_x - 0.5) / 0.25, labels[c.num_train :]
        self.memory: tuple[torch.Tensor, torch.Tensor] | None = None
        if c.in_memory:
            samples = load_samples(self.train_dataset, range(c.num_train), run.seed, epoch=0)
            self.memory = (torch.stack([x for x, _ in samples]), torch.stack([y for _, y in samples]))
            self.train_dataset = None
        model = make_cnn(c.width)
        group = build_group("model", model.parameters(), c.optimizer, run.steps, lr_multiplier(run))
        super().__init__({"model": model}, [group])

    @property
    def num_train(self) -> int:
        return len(self.memory[1]) if self.memory is not None else super().num_train

    def train_batch(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.memory is not None
        return self.memory[0][indices], self.memory[1][indices]

    def item_counts(self, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, int]:
        return {"loss": len(batch[1])}

    def losses(
        self, models: dict[str, nn.Module], batch: tuple[torch.Tensor, torch.Tensor]
    ) -> Iterator[tuple[str, torch.Tensor]]:
        x, y = batch
        yield "loss", F.cross_entropy(models["model"](x), y, reduction="sum")

    def evaluate(self, models: dict[str, nn.Module], rank: int, world_size: int) -> dict[str, torch.Tensor]:
        x, y = self.eval_x[rank::world_size], self.eval_y[rank::world_size]
        with torch.no_grad():
            correct = (models["model"](x).argmax(dim=1) == y).sum().double()
        return {"accuracy": torch.stack([correct, torch.tensor(float(len(y)), dtype=torch.float64)])}


def build(run: RunConfig) -> ImagesRecipe:
    return ImagesRecipe(run)


# --------------------------------------------------------------------------- the job


def recipe_config(
    workers: int, in_memory: bool, steps: int, output_dir: str, run_name: str, *overrides: str
) -> RunConfig:
    """The run config of one side (the recipe registered under RECIPE first)."""
    args = [
        f"recipe={RECIPE}",
        f"steps={steps}",
        f"data.num_workers={workers}",
        f"{SECTION}.in_memory={str(in_memory).lower()}",
        f"output_dir={output_dir}",
        f"run_name={run_name}",
        "progress_bar=false",
        *quiet_args(),
        *overrides,
    ]
    return resolve_config(args, world_size=world_size_from_env())


def trainer_side(trainer: Trainer, batches: Iterator[Any]) -> Callable[[range], float]:
    """Steps of `trainer` fed by its DataLoader's iterator; returns the seconds they waited for data."""

    def run(steps: range) -> float:
        return sum(trainer.train_step(step, batches).data_wait_s for step in steps)

    return run


def interleave_from_steady_state(
    sides: dict[str, Callable[[range], float]], reps: int, steps_per_rep: int, lead_in: int, warmup: int
) -> dict[str, dict[str, list[float]]]:
    """As `bench.harness.interleave` (wall and CPU seconds per block, sides shuffled per repetition),
    plus each block's data wait; but every block first runs `lead_in` untimed steps.

    Between its blocks a side's workers fill their queues up to two windows ahead, then idle: a
    block timed from there would begin with loading done that a run would still owe where the
    workers fall behind (where they keep up, the queue is full in a run too). The lead-in spends
    that head start; and the refill after a side's block, done while the next side runs, falls
    mostly into that side's untimed lead-in rather than into its timed steps.
    """
    for run in sides.values():
        run(range(warmup))
    out: dict[str, dict[str, list[float]]] = {
        key: {side: [] for side in sides} for key in ("seconds", "cpu_seconds", "data_wait_seconds")
    }
    for rep in range(reps):
        start = warmup + rep * (lead_in + steps_per_rep)
        lead, block = range(start, start + lead_in), range(start + lead_in, start + lead_in + steps_per_rep)
        for side in shuffled(list(sides), rep):
            run, waited = sides[side], []
            run(lead)
            wall, cpu = timed(lambda run=run, block=block, waited=waited: waited.append(run(block)))
            out["seconds"][side].append(wall)
            out["cpu_seconds"][side].append(cpu)
            out["data_wait_seconds"][side].append(waited[0])
    return out


def load_seconds_per_sample(dataset: Dataset, seed: int, count: int = 64, repeats: int = 3) -> float:
    """Median seconds to load one sample inline (decode and augment), for the record."""
    times = []
    for r in range(repeats):
        start = time.perf_counter()
        load_samples(dataset, range(count), seed, epoch=r)
        times.append((time.perf_counter() - start) / count)
    return statistics.median(times)


def main() -> None:
    parser = job_parser(__doc__)
    parser.add_argument("--steps-per-rep", type=int, help="optimizer steps per timed block")
    parser.add_argument("--workers", default=",".join(map(str, WORKERS)), help="worker counts, comma-separated")
    parser.add_argument("--threads", type=int, default=THREADS, help="compute threads of the training process")
    parser.add_argument("--num-train", type=int, help="training images (fewer build faster; the steps cycle over them)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    steps = args.steps_per_rep or (2 if args.quick else STEPS_PER_REP)
    warmup = 1 if args.quick else 2
    total = warmup + args.reps * (LEAD_IN + steps)
    runs = scratch_dir() + "/runs"

    settings = {
        "memory": (0, True),
        # A second, identical in-memory side: its ratio to the first is the noise floor of this run.
        "memory_copy": (0, True),
        **{f"workers_{n}": (n, False) for n in map(int, args.workers.split(","))},
    }
    overrides = [f"{SECTION}.num_train={args.num_train}"] if args.num_train else []
    trainers = {
        side: Trainer(recipe_config(workers, in_memory, total, runs, f"data-{side}", *overrides))
        for side, (workers, in_memory) in settings.items()
    }
    with contextlib.ExitStack() as loaders:
        # Each side's loader lives through the job, as it lives through a run in `fit`: its workers
        # start once.
        sides = {
            side: trainer_side(trainer, loaders.enter_context(trainer._micro_batches()))
            for side, trainer in trainers.items()
        }
        times = interleave_from_steady_state(sides, args.reps, steps, LEAD_IN, warmup)
    reference = next(t for t in trainers.values() if t.recipe.train_dataset is not None)
    c = reference.cfg.recipe_config
    write_result(
        args.out,
        {
            "world_size": reference.world_size,
            "threads": torch.get_num_threads(),
            "cores": os.cpu_count(),
            "parameters": parameter_count(reference.recipe.models["model"]),
            "micro_batch": reference.cfg.micro_batch_size,
            "accumulation": reference.accumulation,
            "image_size": c.image_size,
            "crop": c.crop,
            "num_train": c.num_train,
            "compressed_ratio": sum(map(len, reference.recipe.train_dataset.blobs))
            / (len(reference.recipe.train_dataset) * 3 * c.image_size**2),
            "load_ms_per_sample": 1e3 * load_seconds_per_sample(reference.recipe.train_dataset, reference.cfg.seed),
            "workers": {side: workers for side, (workers, _) in settings.items()},
            "steps_per_rep": steps,
            "lead_in_steps": LEAD_IN,
            "reps": args.reps,
            **times,
        },
    )
    finish()


if __name__ == "__main__":
    main()
