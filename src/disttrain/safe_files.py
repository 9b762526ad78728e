"""Checkpoint files: written with their checksum, read without running code from them, and the
error that names what is wrong.

`.pt` files are read with `torch.load(weights_only=True)`: tensors and plain containers only,
never arbitrary objects.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import pickle
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._pytree import tree_map_only


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
    """Write `data` to `path`; returns its sha256, computed from the bytes in memory (no second read).
    A write that fails (a full disk) leaves no partial file behind."""
    try:
        with open(path, "wb") as f:
            f.write(data)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(path)
        raise
    return hashlib.sha256(data).hexdigest()


def save_torch(obj: Any, path: str) -> str:
    """`torch.save` to `path`; returns the file's sha256 (see write_bytes)."""
    return write_bytes(path, torch_bytes(obj))


def torch_bytes(obj: Any) -> bytes:
    """What `torch.save` writes for `obj`, in memory."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getbuffer().tobytes()


def serialized_now(obj: Any, to_bytes: Callable[[Any], bytes]) -> Callable[[], bytes]:
    """`obj`'s bytes, made now (while sharded weights are gathered, say)."""
    data = to_bytes(obj)
    return lambda: data


def copied_for_later(obj: Any, to_bytes: Callable[[Any], bytes]) -> Callable[[], bytes]:
    """`obj`'s bytes, made later from a copy of its tensors taken now: a copy costs a step a memory
    copy, serializing (pickling, checksums) is left to the thread that writes."""
    kept = tree_map_only(torch.Tensor, lambda t: t.detach().clone(), obj)
    return lambda: to_bytes(kept)


def file_sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


# What torch.distributed.checkpoint's `.metadata` pickle may name: its own plain records, torch's
# sizes, dtypes and layouts, and the path a checkpoint was written to. Anything else is refused.
_DCP_METADATA_GLOBALS = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata",
        "MetadataIndex",
        "StorageMeta",
        "TensorProperties",
        "TensorStorageMetadata",
        "ChunkStorageMetadata",
        "BytesStorageMetadata",
        "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"Path", "PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
}


class _DCPMetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if name in _DCP_METADATA_GLOBALS.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a checkpoint's metadata")


def dcp_reader(path: str) -> Any:
    """A `torch.distributed.checkpoint` reader of the folder `path` that runs no code from its files:
    tensors are read with `torch.load(weights_only=True)` (as DCP does), and the `.metadata` pickle
    may name only DCP's own records (`pickle.load` would construct anything it names). The metadata
    is read here, so that a refusal is raised as it is (DCP would try other files after it)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    file = os.path.join(path, ".metadata")
    try:
        with open(file, "rb") as f:
            metadata = _DCPMetadataUnpickler(f).load()
    except Exception as e:
        raise CheckpointError(f"{file} is unreadable ({str(e).splitlines()[0]})") from e

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(path)


def dcp_planner() -> Any:
    """DCP's default load planner, reading non-tensor values (an optimizer's settings, step counts)
    with `torch.load(weights_only=True)`: DCP's own `load_bytes` unpickles them without limits."""
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint._traverse import set_element

    class SafePlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
            plain = torch.load(value, map_location="cpu", weights_only=True)
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], plain)
            else:
                self.state_dict[read_item.dest_index.fqn] = plain

    return SafePlanner()
