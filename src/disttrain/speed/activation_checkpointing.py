"""`activation_checkpointing=true`: the recipe's blocks keep only their inputs for backward.

The blocks are the module classes the recipe names in `shard_blocks` (seq2seq: its Transformer
layers). A checkpointed block frees its intermediate activations after forward and recomputes them
in backward: activation memory of a block drops to its input, at the cost of a second forward of it.
The gradients are those of the plain run: `preserve_rng_state` replays the random state of the
forward in the recomputation, so dropout draws the same masks.

Each block's forward is replaced on the module itself, before the engine wraps the models: the
block keeps its class (FSDP2 still makes it a unit), its parameter names and its state dict, so
checkpoints do not change.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn
from torch.utils.checkpoint import checkpoint


class _Recomputed:
    """A block's forward that saves only its inputs; non-reentrant: it supports keyword arguments,
    blocks whose inputs need no gradient, and backward hooks (DDP, FSDP) inside the block."""

    def __init__(self, forward: Callable[..., Any]):
        self.forward = forward

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return checkpoint(self.forward, *args, use_reentrant=False, preserve_rng_state=True, **kwargs)


def checkpoint_blocks(models: dict[str, nn.Module], block_classes: tuple[type[nn.Module], ...], every: int) -> int:
    """Checkpoint every `every`-th block of each model (the `every`-th, the 2 x `every`-th, ... in
    module order); returns how many blocks were checkpointed."""
    done = 0
    for model in models.values():
        blocks = [m for m in model.modules() if isinstance(m, block_classes)]
        for index, block in enumerate(blocks, start=1):
            if index % every == 0:
                block.forward = _Recomputed(block.forward)
                done += 1
    return done
