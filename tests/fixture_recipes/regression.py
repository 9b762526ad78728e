"""regression: a user's recipe in one module, outside src/disttrain (a linear model, squared error).

`python train.py recipe=tests.fixture_recipes.regression regression.noise=0.1` trains it. A recipe in
one file imports torch at its top, so its --help takes as long as that import; the built-in recipes
keep their keys in a torch-free `__init__.py` instead.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from disttrain.config import Config as RunConfig
from disttrain.config import OptimizerConfig, at_least, lr_multiplier, section, setting
from disttrain.optim import build_group
from disttrain.recipe import Recipe

RUN_DEFAULTS = {"steps": 12, "global_batch_size": 32, "micro_batch_size": 8, "log_every": 4}


@dataclass
class Config:
    num_features: int = setting(5, "inputs of the linear model")
    num_train: int = setting(200, "training samples, generated from the seed")
    noise: float = setting(0.05, "standard deviation of the label noise")
    optimizer: OptimizerConfig = section(
        lambda: OptimizerConfig(name="sgd", lr=0.05, momentum=0.9, schedule="constant"), "the optimizer"
    )

    def validate(self, run: RunConfig) -> None:
        at_least(f"{run.recipe_section}.num_features", self.num_features, 1)
        at_least(f"{run.recipe_section}.noise", self.noise, 0)
        self.optimizer.validate(f"{run.recipe_section}.optimizer", run.steps)


class RegressionRecipe(Recipe):
    def __init__(self, run: RunConfig):
        c: Config = run.recipe_config
        g = torch.Generator().manual_seed(run.seed)
        self.x = torch.randn(c.num_train + 64, c.num_features, generator=g)
        truth = torch.randn(c.num_features, 1, generator=g)
        self.y = self.x @ truth + c.noise * torch.randn(len(self.x), 1, generator=g)
        self.count = c.num_train
        model = nn.Linear(c.num_features, 1)
        super().__init__(
            {"model": model}, [build_group("model", model.parameters(), c.optimizer, run.steps, lr_multiplier(run))]
        )

    @property
    def num_train(self) -> int:
        return self.count

    def train_batch(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[indices], self.y[indices]

    def item_counts(self, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, int]:
        return {"loss": len(batch[0])}

    def losses(
        self, models: dict[str, nn.Module], batch: tuple[torch.Tensor, torch.Tensor]
    ) -> Iterator[tuple[str, torch.Tensor]]:
        x, y = batch
        yield "loss", (models["model"](x) - y).pow(2).sum()

    def evaluate(self, models: dict[str, nn.Module], rank: int, world_size: int) -> dict[str, torch.Tensor]:
        x, y = self.x[self.count :][rank::world_size], self.y[self.count :][rank::world_size]
        with torch.no_grad():
            error = (models["model"](x) - y).pow(2).sum().double()
        return {"mse": torch.stack([error, torch.tensor(float(len(y)), dtype=torch.float64)])}


def build(run: RunConfig) -> RegressionRecipe:
    return RegressionRecipe(run)
