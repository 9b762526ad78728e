"""An optimizer as third-party packages write them: every constructor argument required."""

from __future__ import annotations

import torch


class StrictSGD(torch.optim.Optimizer):
    """SGD with a damping factor; `lr` and `damping` have no defaults."""

    def __init__(self, params, lr: float, damping: float):
        super().__init__(params, {"lr": lr, "damping": damping})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad, alpha=-group["lr"] * (1 - group["damping"]))
