"""What a recipe is: the models, optimizers, data and losses of a run.

A recipe knows nothing of processes, `no_sync` or loss scaling. It returns *summed* per-item losses
and says how many items each sums over; the accumulation core turns that into the exact update.
Copy `recipes/classifier/` (one model) or `recipes/seq2seq/` (two optimizers, two losses) to start
your own: its `__init__.py` holds the keys and defaults, `recipe.py` the models, data and losses.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset, IterableDataset, default_collate

from disttrain.accumulation import ItemCounts, OptimizerGroup
from disttrain.config import Config, ConfigError, recipe_module
from disttrain.data.samples import load_samples
from disttrain.data.windows import MicroBatchPlan

LossStream = Callable[[dict[str, nn.Module], Any], Iterator[tuple[str, torch.Tensor]]]


@dataclass
class Phase:
    """One accumulation window and one update inside a training step.

    Most recipes have a single phase that trains everything; a GAN has a discriminator phase and a
    generator phase. Only `models` are synchronised, clipped and zeroed; `frozen` modules take part
    in the forward without gradients of their own (requires_grad off for the window).
    """

    name: str
    models: tuple[str, ...]
    groups: list[OptimizerGroup]
    terms: tuple[str, ...]
    item_counts: ItemCounts
    losses: LossStream  # called with the trainer's (prepared) models and a micro-batch
    make_batch: Callable[[MicroBatchPlan], Any]
    data_step: int  # which global batch of the data order this window uses
    frozen: tuple[nn.Module, ...] = ()
    after_update: Callable[[], None] | None = field(default=None)  # e.g. an EMA of the weights


class Recipe(ABC):
    #: names of the loss terms, in the order `losses` yields them; each is averaged over its own items
    terms: tuple[str, ...] = ("loss",)
    #: set when the last loss term does not reach every parameter (DDP must then look for unused ones)
    find_unused_parameters: bool = False
    #: module classes that FSDP shards as units of their own (transformer layers), inside each model's
    #: own unit; empty: one unit per model
    shard_blocks: tuple[type[nn.Module], ...] = ()

    def __init__(self, models: dict[str, nn.Module], groups: list[OptimizerGroup]):
        self.models = models
        self.groups = groups
        self.run_dir: str | None = None  # set by the trainer, for files an evaluation writes (plots)
        self.main_process = True  # set by the trainer: the one process that writes such files
        # Set by the trainer to its engine's: inside the block a module's weights are whole (ZeRO 3
        # partitions them), e.g. to update a moving average of them.
        self.full_weights: Callable[[nn.Module], contextlib.AbstractContextManager] = lambda module: (
            contextlib.nullcontext()
        )
        # Set by the trainer to its engine's: a forward of a trained model that a loss on its input
        # gradient (R1) may differentiate twice (FSDP frees gathered weights inside that pass).
        self.input_gradient_forward: Callable[[nn.Module], Callable[..., Any]] = lambda module: module

    # Training data comes one of two ways. Usually a map-style `torch.utils.data.Dataset` (a Hugging
    # Face `datasets.Dataset` is one) in `train_dataset`, whose samples `collate` joins into a
    # micro-batch; each sample is loaded under its own seed (disttrain.data.samples). Or, for data
    # already in memory as tensors, `train_batch(indices)` slicing them at once. Either runs in the
    # trainer's DataLoader workers (num_workers), so it must not touch the models.

    #: the training samples, or None where `train_batch` is overridden
    train_dataset: Dataset | None = None
    seed: int = 0  # set by the trainer to the run's seed: keys per-sample randomness

    @property
    def num_train(self) -> int:
        """Number of training samples; the sampler draws indices below it."""
        if self.train_dataset is None:
            raise NotImplementedError(f"{type(self).__name__} sets no train_dataset: define num_train")
        return len(self.train_dataset)

    def collate(self, samples: list[Any]) -> Any:
        """Join the samples of one micro-batch (PyTorch's default stacks tensors, numbers and dicts)."""
        return default_collate(samples)

    def train_batch(self, indices: list[int]) -> Any:
        """Collate the training samples at `indices` into one micro-batch (on the CPU)."""
        raise NotImplementedError(f"{type(self).__name__} sets neither train_dataset nor train_batch")

    def load_batch(self, plan: MicroBatchPlan) -> Any:
        """The micro-batch of `plan`: from `train_dataset` if there is one, else `train_batch`."""
        if self.train_dataset is None:
            return self.train_batch(plan.indices)
        return self.collate(load_samples(self.train_dataset, plan.indices, self.seed, plan.epoch))

    def check_data(self) -> None:
        """Refuse data the window plan cannot index (called by the trainer before training)."""
        if isinstance(self.train_dataset, IterableDataset):
            raise ConfigError(
                f"{type(self).__name__}.train_dataset is an IterableDataset: the exact update needs the samples "
                "of every window known by index (so that any world size and worker count, and a resume, see the "
                "same ones). Give a map-style Dataset (__getitem__ and __len__; a memory-mapped file keeps a "
                "large one lazy) or a datasets.Dataset instead of an IterableDataset"
            )
        self.num_train  # noqa: B018  (raises when neither way of giving data is defined)

    # A single-phase recipe implements `item_counts` and `losses`; one with several phases (the GAN)
    # overrides `phases` instead and gives each phase its own.

    def item_counts(self, batch: Any) -> dict[str, Any]:
        """Items each loss term sums over in `batch`, without a forward: samples, or valid tokens."""
        raise NotImplementedError(f"{type(self).__name__} defines neither item_counts nor phases()")

    def losses(self, models: dict[str, nn.Module], batch: Any) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield `(term, loss summed over the batch's items)` for each term, in `terms` order."""
        raise NotImplementedError(f"{type(self).__name__} defines neither losses nor phases()")

    @abstractmethod
    def evaluate(self, models: dict[str, nn.Module], rank: int, world_size: int) -> dict[str, torch.Tensor]:
        """Metric numerators and denominators over this process's share of the held-out data.

        Returns `{name: tensor([sum, count])}`; the trainer sums them over processes and divides.
        """

    def phases(self, step: int) -> list[Phase]:
        """The phases of optimizer step `step`: by default one that trains every model."""
        return [
            Phase(
                name="train",
                models=tuple(self.models),
                groups=self.groups,
                terms=self.terms,
                item_counts=self.item_counts,
                losses=self.losses,
                make_batch=self.load_batch,
                data_step=step,
            )
        ]

    def exported_models(self) -> dict[str, nn.Module]:
        """The weights written at the end of a run, one safetensors file each."""
        return self.models

    def data_steps(self, steps: int) -> int:
        """Global batches of data that `steps` optimizer steps consume."""
        return steps

    def images(self) -> list[str]:
        """PNG files the last evaluation wrote (plots), logged to the tracker; on the main process."""
        return []

    def summary(self, metrics: dict[str, float]) -> str:
        """One phrase on the recipe's quality for the final summary line."""
        return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())


def build_recipe(cfg: Config) -> Recipe:
    """Import the configured recipe's module and build it (models, optimizers, data)."""
    return recipe_module(cfg.recipe).build(cfg)
