"""The simplest recipe: one network, one optimizer, a per-sample loss.

The data is synthetic: Gaussian inputs labelled by a fixed random "teacher" network, so the task is
learnable, needs no download and is the same on every machine for a given seed.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from disttrain.config import ClassifierConfig, Config, lr_multiplier
from disttrain.optim import build_group
from disttrain.recipes.base import Recipe


def make_mlp(c: ClassifierConfig) -> nn.Sequential:
    layers: list[nn.Module] = []
    width = c.num_features
    for _ in range(c.depth):
        layers.append(nn.Linear(width, c.hidden))
        if c.batchnorm:
            layers.append(nn.BatchNorm1d(c.hidden))
        layers.append(nn.GELU())
        width = c.hidden
    layers.append(nn.Linear(width, c.num_classes))
    return nn.Sequential(*layers)


def make_task(c: ClassifierConfig, count: int, seed: int, split: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs of one split and their labels; the teacher depends on `seed` only, so splits agree."""
    teacher = torch.randn(c.num_features, c.num_classes, generator=torch.Generator().manual_seed(seed))
    x = torch.randn(count, c.num_features, generator=torch.Generator().manual_seed(seed * 1_000_003 + split + 1))
    return x, (torch.tanh(x) @ teacher).argmax(dim=1)


class ClassifierRecipe(Recipe):
    def __init__(self, cfg: Config):
        c = cfg.classifier
        self.train_x, self.train_y = make_task(c, c.num_train, cfg.seed, split=0)
        self.eval_x, self.eval_y = make_task(c, c.num_eval, cfg.seed, split=1)
        model = make_mlp(c)
        group = build_group("model", model.parameters(), c.optimizer, cfg.steps, lr_multiplier(cfg))
        super().__init__({"model": model}, [group])

    @property
    def num_train(self) -> int:
        return len(self.train_y)

    def train_batch(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.train_x[indices], self.train_y[indices]

    def item_counts(self, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, int]:
        return {"loss": len(batch[1])}

    def losses(
        self, models: dict[str, nn.Module], batch: tuple[torch.Tensor, torch.Tensor]
    ) -> Iterator[tuple[str, torch.Tensor]]:
        x, y = batch
        yield "loss", F.cross_entropy(models["model"](x), y, reduction="sum")

    def evaluate(self, models: dict[str, nn.Module], rank: int, world_size: int) -> dict[str, torch.Tensor]:
        model = models["model"]
        device = next(model.parameters()).device
        x, y = self.eval_x[rank::world_size].to(device), self.eval_y[rank::world_size].to(device)
        with torch.no_grad():
            correct = (model(x).argmax(dim=1) == y).sum().double()
        return {"accuracy": torch.stack([correct, torch.tensor(float(len(y)), dtype=torch.float64, device=device)])}


def build(cfg: Config) -> ClassifierRecipe:
    return ClassifierRecipe(cfg)
