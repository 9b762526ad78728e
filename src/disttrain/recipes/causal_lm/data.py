"""The causal_lm samples: windows of documents, or packed blocks, read from memory-mapped tokens.

Every sample has the same shape (`block_size` inputs), so micro-batches stack without padding to a
batch-dependent width: the logits of a token never depend on which other samples share its batch.
What differs between samples is how many of their targets count (`labels` other than IGNORE).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Dataset

from disttrain.data.samples import sample_seed
from disttrain.data.tokens import TokenSplit

IGNORE = -100  # a target that is not scored (padding, the start of the next document)


def _sample(window: np.ndarray, block_size: int) -> dict[str, torch.Tensor]:
    """Inputs and next-token targets of `window` (at most block_size + 1 tokens), right-padded."""
    tokens = torch.from_numpy(window.astype(np.int64))
    used = len(tokens) - 1
    input_ids = torch.zeros(block_size, dtype=torch.long)
    labels = torch.full((block_size,), IGNORE, dtype=torch.long)
    input_ids[:used], labels[:used] = tokens[:-1], tokens[1:]
    return {"input_ids": input_ids, "labels": labels, "position_ids": torch.arange(block_size)}


class DocumentWindows(Dataset):
    """Sample `i` is a window of document `i`: its first block_size + 1 tokens when it is that short
    (padded, the padding not scored), else a chunk at a random offset drawn from the sample's own
    seed, so the same (seed, epoch, index) gives the same chunk whoever loads it and each epoch
    sees other chunks of long documents."""

    def __init__(self, split: TokenSplit, block_size: int):
        self.split, self.block_size = split, block_size

    def __len__(self) -> int:
        return self.split.num_documents

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        start, end = self.split.document(i)
        span = self.block_size + 1
        if end - start > span:
            generator = torch.Generator().manual_seed(sample_seed())
            start += int(torch.randint(0, end - start - span + 1, (1,), generator=generator))
        return _sample(self.split.tokens[start : min(end, start + span)], self.block_size)


class PackedBlocks(Dataset):
    """Sample `i` is block `i` of the split's token stream (documents back to back), confined to
    documents: position ids restart at each document start (and at the block start), which
    transformers turns into a block-diagonal causal mask when no attention mask and no cache is
    passed; a target that starts the next document is not scored. Every block is full."""

    def __init__(self, split: TokenSplit, block_size: int):
        self.split, self.block_size = split, block_size

    def __len__(self) -> int:
        return (self.split.num_tokens - 1) // self.block_size

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        b = self.block_size
        first = i * b
        sample = _sample(self.split.tokens[first : first + b + 1], b)
        starts = self.split.index[:, 0]
        inside = np.asarray(starts[np.searchsorted(starts, first + 1) : np.searchsorted(starts, first + b + 1)]) - first
        # positions 1..b of the window that open a document: the input there restarts at 0, and the
        # target one before it (that document's begin-of-document token) is not scored
        sample["labels"][inside - 1] = IGNORE
        opened = np.zeros(b, dtype=np.int64)
        opened[inside[inside < b]] = inside[inside < b]
        sample["position_ids"] = torch.arange(b) - torch.from_numpy(np.maximum.accumulate(opened))
        return sample


def eval_documents(split: TokenSplit, max_tokens: int) -> list[int]:
    """Held-out documents to score: whole documents in a fixed shuffled order (the same for every
    run and seed, so results compare), each taken if it still fits in `max_tokens`; the smallest
    one when none fits."""
    order = np.random.default_rng(0).permutation(split.num_documents).tolist()
    lengths = {d: split.document(d)[1] - split.document(d)[0] for d in order}
    chosen, tokens = [], 0
    for d in order:
        if tokens + lengths[d] <= max_tokens:
            chosen.append(d)
            tokens += lengths[d]
    return sorted(chosen) or [min(order, key=lengths.__getitem__)]


def eval_batches(split: TokenSplit, documents: list[int], block_size: int, batch_size: int) -> Iterator[dict]:
    """Every token of `documents` but their begin-of-document token scored exactly once: windows of
    block_size + 1 tokens overlapping by one, each starting its positions at 0."""
    windows = []
    for d in documents:
        start, end = split.document(d)
        windows += [(s, min(s + block_size + 1, end)) for s in range(start, end - 1, block_size)]
    for first in range(0, len(windows), batch_size):
        samples = [_sample(split.tokens[s:e], block_size) for s, e in windows[first : first + batch_size]]
        yield {k: torch.stack([s[k] for s in samples]) for k in samples[0]}
