"""sequences: a tiny language model on padded sequences of several lengths, for `python -m disttrain.check`.

Batches follow the Hugging Face convention: `tokens` and `labels`, with -100 where nothing is scored
(padding). The loss sums over scored tokens. `sequences.count=tokens` is correct for a mean over
tokens; `sequences.count=sequences` is the mistake every process count shares: `item_counts` gives
the number of sequences, so a window's token losses are divided by its sequences.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from disttrain.config import Config as RunConfig
from disttrain.config import OptimizerConfig, one_of, section, setting
from disttrain.optim import build_group
from disttrain.recipe import Recipe

RUN_DEFAULTS = {"steps": 3}
VOCAB, LENGTH, IGNORE = 11, 6, -100


@dataclass
class Config:
    count: str = setting("tokens", "what item_counts() counts: tokens or sequences")
    optimizer: OptimizerConfig = section(lambda: OptimizerConfig(name="sgd", lr=0.1), "the optimizer")

    def validate(self, run: RunConfig) -> None:
        one_of(f"{run.recipe_section}.count", self.count, ("tokens", "sequences"))


class SequencesRecipe(Recipe):
    terms = ("tokens",)

    def __init__(self, run: RunConfig):
        self.count = run.recipe_config.count
        g = torch.Generator().manual_seed(run.seed)
        self.tokens = torch.randint(VOCAB, (120, LENGTH), generator=g)
        lengths = torch.randint(2, LENGTH + 1, (120,), generator=g)
        self.labels = ((self.tokens * 3 + 1) % VOCAB).masked_fill(torch.arange(LENGTH) >= lengths[:, None], IGNORE)
        model = nn.Sequential(nn.Embedding(VOCAB, 8), nn.Tanh(), nn.Linear(8, VOCAB))
        super().__init__(
            {"model": model}, [build_group("model", model.parameters(), run.recipe_config.optimizer, run.steps)]
        )

    @property
    def num_train(self) -> int:
        return len(self.tokens)

    def train_batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        return {"tokens": self.tokens[indices], "labels": self.labels[indices]}

    def item_counts(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | int]:
        if self.count == "sequences":
            return {"tokens": len(batch["labels"])}
        return {"tokens": (batch["labels"] != IGNORE).sum()}

    def losses(
        self, models: dict[str, nn.Module], batch: dict[str, torch.Tensor]
    ) -> Iterator[tuple[str, torch.Tensor]]:
        logits = models["model"](batch["tokens"])
        yield "tokens", nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), reduction="sum")

    def evaluate(self, models: dict[str, nn.Module], rank: int, world_size: int) -> dict[str, torch.Tensor]:
        one = torch.ones((), dtype=torch.float64)
        return {"nothing": torch.stack([one, one])}


def build(run: RunConfig) -> SequencesRecipe:
    return SequencesRecipe(run)
