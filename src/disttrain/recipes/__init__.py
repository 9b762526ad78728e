"""Recipe registry. Names map to modules so that choosing a recipe imports only that recipe."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from disttrain.config import Config
    from disttrain.recipes.base import Recipe

RECIPES = {
    "seq2seq": "disttrain.recipes.seq2seq",
    "classifier": "disttrain.recipes.classifier",
    "gan": "disttrain.recipes.gan",
}


def build_recipe(cfg: Config) -> Recipe:
    """Import the configured recipe's module and build it (models, optimizers, data)."""
    module = importlib.import_module(RECIPES[cfg.recipe])
    return module.build(cfg)
