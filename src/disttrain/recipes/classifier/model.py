"""The classifier's model, in torch alone (no disttrain import): copy this file beside your inference
code and exported weights load without the template (`load_file` and `load_state_dict`)."""

from __future__ import annotations

from torch import nn


def make_mlp(num_features: int, hidden: int, depth: int, num_classes: int, batchnorm: bool = False) -> nn.Sequential:
    """`depth` hidden layers of width `hidden` (Linear, optional BatchNorm, GELU), then the classes."""
    layers: list[nn.Module] = []
    width = num_features
    for _ in range(depth):
        layers.append(nn.Linear(width, hidden))
        if batchnorm:
            layers.append(nn.BatchNorm1d(hidden))
        layers.append(nn.GELU())
        width = hidden
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)
