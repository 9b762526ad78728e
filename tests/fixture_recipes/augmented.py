"""augmented: a user's recipe with a map-style Dataset whose samples are randomly augmented.

The augmentation draws from the global torch generator (as torchvision's transforms do) and from a
generator seeded with `sample_seed()`; the model has dropout, drawn in the training process. The
batches and the final weights must not depend on the number of DataLoader workers or processes.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import Dataset

from disttrain.config import Config as RunConfig
from disttrain.config import OptimizerConfig, lr_multiplier, section, setting
from disttrain.data.samples import sample_seed
from disttrain.optim import build_group
from disttrain.recipe import Recipe

RUN_DEFAULTS = {"steps": 10, "global_batch_size": 24, "micro_batch_size": 4, "log_every": 5}


@dataclass
class Config:
    num_train: int = setting(60, "training samples (60 / 24: every epoch ends in a shorter window)")
    dropout: float = setting(0.3, "dropout: drawn per process, so only world size 1 runs compare with it on")
    optimizer: OptimizerConfig = section(lambda: OptimizerConfig(lr=0.01, schedule="constant"), "the optimizer")

    def validate(self, run: RunConfig) -> None:
        self.optimizer.validate(f"{run.recipe_section}.optimizer", run.steps)


class NoisyPoints(Dataset):
    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        jitter = 0.1 * torch.randn(self.x.shape[1])  # the global generator, seeded per sample
        scale = 1 + 0.2 * torch.rand((), generator=torch.Generator().manual_seed(sample_seed()))
        return {"x": self.x[i] * scale + jitter, "y": self.y[i], "index": torch.tensor(i)}


class AugmentedRecipe(Recipe):
    def __init__(self, run: RunConfig):
        c: Config = run.recipe_config
        g = torch.Generator().manual_seed(run.seed)
        x = torch.randn(c.num_train + 16, 6, generator=g)
        y = torch.tanh(x @ torch.randn(6, 1, generator=g))
        self.train_dataset = NoisyPoints(x[: c.num_train], y[: c.num_train])
        self.eval_x, self.eval_y = x[c.num_train :], y[c.num_train :]
        model = nn.Sequential(nn.Linear(6, 16), nn.Dropout(c.dropout), nn.Tanh(), nn.Linear(16, 1))
        group = build_group("model", model.parameters(), c.optimizer, run.steps, lr_multiplier(run))
        super().__init__({"model": model}, [group])

    def item_counts(self, batch: dict[str, torch.Tensor]) -> dict[str, int]:
        return {"loss": len(batch["y"])}

    def losses(
        self, models: dict[str, nn.Module], batch: dict[str, torch.Tensor]
    ) -> Iterator[tuple[str, torch.Tensor]]:
        yield "loss", (models["model"](batch["x"]) - batch["y"]).pow(2).sum()

    def evaluate(self, models: dict[str, nn.Module], rank: int, world_size: int) -> dict[str, torch.Tensor]:
        x, y = self.eval_x[rank::world_size], self.eval_y[rank::world_size]
        with torch.no_grad():
            error = (models["model"](x) - y).pow(2).sum().double()
        return {"mse": torch.stack([error, torch.tensor(float(len(y)), dtype=torch.float64)])}


def build(run: RunConfig) -> AugmentedRecipe:
    return AugmentedRecipe(run)
