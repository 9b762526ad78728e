"""Checkpoint files: written with their checksum, read without running code from them, and the
error that names what is wrong.

`.pt` files are read with `torch.load(weights_only=True)`: tensors and plain containers only,
never arbitrary objects.
"""

from __future__ import annotations

import hashlib
import io
import os
from typing import Any

import torch


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed from; the message says what is wrong and what to do."""


def safe_load(file: str, checkpoint: str, allowed: list[Any] | None = None) -> Any:
    """A `.pt` file of `checkpoint`, with only tensors, plain containers and the `allowed` types."""
    # To the CPU whatever device wrote it ("cpu:0" tags do not restore): load_state_dict moves state
    # to its parameters' device.
    try:
        with torch.serialization.safe_globals(allowed or []):
            return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(
            f"checkpoint {checkpoint}: {os.path.relpath(file, checkpoint)} is unreadable ({str(e).splitlines()[0]})"
        ) from e


def write_bytes(path: str, data: bytes) -> str:
    """Write `data` to `path`; returns its sha256, computed from the bytes in memory (no second read)."""
    with open(path, "wb") as f:
        f.write(data)
    return hashlib.sha256(data).hexdigest()


def save_torch(obj: Any, path: str) -> str:
    """`torch.save` to `path`; returns the file's sha256 (see write_bytes)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return write_bytes(path, buffer.getbuffer().tobytes())


def file_sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
