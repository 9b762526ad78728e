"""Prepared token data on disk: what the files are, and reading them lazily from any process.

A prepared directory (written by `python -m disttrain.prepare`) holds, per split (`train`, `eval`):

    <split>.bin   every document's tokens, one after the other (uint16, or uint32 for a vocabulary
                  above 65536); each document starts with the begin-of-document token
    <split>.idx   int64, shape (documents + 1, 2): where each document starts, as (token offset, byte
                  offset) into the split; the last row is (total tokens, total bytes)
    meta.json     the tokenizer, vocabulary size, begin-of-document token, token dtype, and per split
                  the counts of documents, tokens and bytes and the unigram byte entropy

meta.json is written last: a directory without it is not (yet) prepared. Readers map the files
(`np.memmap`) on first use in each process, so a data set pickled into a DataLoader worker or a
spawned process carries paths, never the tokens.

numpy only: the recipe's config checks read meta.json without importing torch.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

FORMAT = 1  # bump when the layout changes: a cached directory of another format is prepared again
META = "meta.json"
SPLITS = ("train", "eval")
BYTES = "bytes"  # the tokenizer name of byte-level tokens: 256 byte values, then the begin-of-document token


def bin_path(directory: str, split: str) -> str:
    return os.path.join(directory, f"{split}.bin")


def idx_path(directory: str, split: str) -> str:
    return os.path.join(directory, f"{split}.idx")


def is_prepared(directory: str) -> bool:
    """Whether `directory` holds a complete prepared data set of this format."""
    try:
        return read_meta(directory).get("format") == FORMAT
    except (OSError, ValueError):
        return False


def read_meta(directory: str) -> dict[str, Any]:
    """The meta.json of a prepared directory (raises OSError when there is none)."""
    with open(os.path.join(directory, META)) as f:
        return json.load(f)


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned type that holds every token id."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


class TokenSplit:
    """One split of a prepared directory: its documents' tokens, read through a memory map.

    The maps are opened on first access in each process and left out of the pickled state, so a
    copy sent to a DataLoader worker or another process opens its own (the pages stay shared in the
    operating system's cache).
    """

    def __init__(self, directory: str, split: str):
        meta = read_meta(directory)
        self.directory, self.split = os.path.abspath(directory), split
        self.dtype = np.dtype(meta["dtype"])
        self.bos = int(meta["bos_token"])
        counts = meta["splits"][split]
        self.num_documents, self.num_tokens, self.num_bytes = counts["documents"], counts["tokens"], counts["bytes"]
        self._tokens: np.ndarray | None = None
        self._index: np.ndarray | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_tokens": None, "_index": None}

    @property
    def tokens(self) -> np.ndarray:
        """All tokens of the split, documents concatenated (a read-only map)."""
        if self._tokens is None:
            self._tokens = np.memmap(bin_path(self.directory, self.split), dtype=self.dtype, mode="r")
            if len(self._tokens) != self.num_tokens:
                raise ValueError(
                    f"{bin_path(self.directory, self.split)} holds {len(self._tokens)} tokens, meta.json says "
                    f"{self.num_tokens}: prepare the directory again"
                )
        return self._tokens

    @property
    def index(self) -> np.ndarray:
        """(token offset, byte offset) of each document start, and the totals as the last row."""
        if self._index is None:
            flat = np.memmap(idx_path(self.directory, self.split), dtype=np.int64, mode="r")
            self._index = flat.reshape(-1, 2)
            if len(self._index) != self.num_documents + 1:
                raise ValueError(
                    f"{idx_path(self.directory, self.split)} holds {len(self._index) - 1} documents, meta.json "
                    f"says {self.num_documents}: prepare the directory again"
                )
        return self._index

    def document(self, i: int) -> tuple[int, int]:
        """Token offsets [start, end) of document `i`, its begin-of-document token included."""
        return int(self.index[i, 0]), int(self.index[i + 1, 0])

    def document_bytes(self, i: int) -> int:
        """Bytes of text document `i` stands for (what bits per byte divide by)."""
        return int(self.index[i + 1, 1] - self.index[i, 1])
