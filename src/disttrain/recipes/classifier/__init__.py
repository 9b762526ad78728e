"""classifier: one network, one optimizer, a per-sample loss (the recipe to copy for a single model).

The data is synthetic: Gaussian inputs labelled by a fixed random "teacher" network, so the task is
learnable, needs no download and is the same on every machine for a given seed. About 3 s on 2 CPU
cores for about 89% held-out accuracy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from disttrain.config import (
    TRAINING_BYTES_PER_PARAMETER,
    OptimizerConfig,
    at_least,
    between,
    fits_in_memory,
    fits_the_data,
    mlp_parameters,
    section,
    setting,
)

if TYPE_CHECKING:
    from disttrain.config import Config as RunConfig
    from disttrain.recipe import Recipe

# This recipe's defaults for run keys; config files and key=value still override them.
RUN_DEFAULTS = {"steps": 600, "global_batch_size": 128, "micro_batch_size": 32}


@dataclass
class Config:
    num_features: int = setting(16, "input features of the synthetic task")
    num_classes: int = setting(4, "classes of the synthetic task")
    hidden: int = setting(64, "hidden width of the MLP")
    depth: int = setting(2, "hidden layers of the MLP")
    batchnorm: bool = setting(False, "add BatchNorm1d after each hidden layer")
    num_train: int = setting(32_768, "training samples, generated from the seed")
    num_eval: int = setting(1024, "held-out samples")
    target_accuracy: float = setting(0.85, "held-out accuracy the run is expected to reach; the summary says if it did")
    optimizer: OptimizerConfig = section(lambda: OptimizerConfig(lr=1e-2), "the model's optimizer")

    def validate(self, run: RunConfig) -> None:
        k = run.recipe_section
        at_least(f"{k}.num_features", self.num_features, 1)
        at_least(f"{k}.num_classes", self.num_classes, 2)
        at_least(f"{k}.depth", self.depth, 1)
        at_least(f"{k}.hidden", self.hidden, 1)
        at_least(f"{k}.num_train", self.num_train, 1)
        at_least(f"{k}.num_eval", self.num_eval, 1)
        between(f"{k}.target_accuracy", self.target_accuracy, 0, 1)
        parameters = mlp_parameters(self.num_features, self.hidden, self.depth, self.num_classes)
        fits_in_memory(
            f"{k}.hidden={self.hidden} and {k}.depth={self.depth}", parameters * TRAINING_BYTES_PER_PARAMETER
        )
        samples = (self.num_train + self.num_eval) * (self.num_features * 4 + 8)  # float32 inputs, int64 labels
        fits_in_memory(f"{k}.num_train={self.num_train} and {k}.num_eval={self.num_eval}", samples, "for the data")
        fits_the_data(run, f"{k}.num_train", self.num_train)
        self.optimizer.validate(f"{k}.optimizer", run.steps)


def build(run: RunConfig) -> Recipe:
    from .recipe import ClassifierRecipe

    return ClassifierRecipe(run)
