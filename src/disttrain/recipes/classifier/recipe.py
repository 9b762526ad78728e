"""The classifier's data, loss and evaluation (its model in model.py, torch alone; its keys in __init__.py)."""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from disttrain.config import Config, lr_multiplier
from disttrain.optim import build_group
from disttrain.recipe import Recipe

from . import Config as ClassifierConfig
from .model import make_mlp


def make_task(c: ClassifierConfig, count: int, seed: int, split: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs of one split and their labels; the teacher depends on `seed` only, so splits agree."""
    teacher = torch.randn(c.num_features, c.num_classes, generator=torch.Generator().manual_seed(seed))
    x = torch.randn(count, c.num_features, generator=torch.Generator().manual_seed(seed * 1_000_003 + split + 1))
    return x, (torch.tanh(x) @ teacher).argmax(dim=1)


class ClassifierRecipe(Recipe):
    def __init__(self, cfg: Config):
        c: ClassifierConfig = cfg.recipe_config
        self.target_accuracy = c.target_accuracy
        self.train_x, self.train_y = make_task(c, c.num_train, cfg.seed, split=0)
        self.eval_x, self.eval_y = make_task(c, c.num_eval, cfg.seed, split=1)
        model = make_mlp(c.num_features, c.hidden, c.depth, c.num_classes, c.batchnorm)
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

    def summary(self, metrics: dict[str, float]) -> str:
        accuracy = metrics["accuracy"]
        verdict = "reached" if accuracy >= self.target_accuracy else "below"
        return f"accuracy {accuracy:.1%} on held-out samples ({verdict} the {self.target_accuracy:.0%} target)"
