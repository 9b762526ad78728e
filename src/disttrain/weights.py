"""Full weights of models as safetensors files: the final export and every checkpoint's weights.

Tied weights (an input embedding that is also the output layer, `lm_head.weight is
transformer.wte.weight`) are one tensor under several names; safetensors refuses to store memory
twice. A file holds each such tensor once, under its first name in state_dict order (the name
transformers keeps too, so `from_pretrained` finds it), and its metadata maps every other name to
that one (`{"aliases": '{"lm_head.weight": "transformer.wte.weight"}'}`). `safetensors.torch.load_file`
reads such a file as it is; `read_weights` gives every name back, the aliases as the same tensor.

safetensors' own `save_model`/`load_model` drop shared names too but fit neither path here:
`save_model` keeps the alphabetically first name (GPT-2's `lm_head.weight`, the one transformers
drops), writes to a path (no bytes to checksum in memory) and needs a module (the export has only
DeepSpeed's state dict); `load_model` takes the ties from the model, never from the file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save
from torch import nn
from torch.distributed.tensor import DTensor

from disttrain.safe_files import write_bytes

if TYPE_CHECKING:  # for annotations only: the export command reads files without an engine
    from disttrain.engines.base import Engine

ALIASES = "aliases"  # metadata key: JSON map of each dropped name to the name the file keeps


def shared_names(state: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """`{alias: kept}` for the entries of `state` that are one tensor under several names; kept is
    the first of them in `state`'s order.

    One tensor means the same view of the same memory: distinct views into one buffer (DeepSpeed
    ZeRO 1/2 keeps all parameters in one flat buffer) are distinct tensors. Called on the module's
    own tensors, before any copy: `.cpu()` of a GPU tensor makes one copy per name.
    """
    first: dict[tuple, str] = {}
    aliases = {}
    for name, tensor in state.items():
        if isinstance(tensor, DTensor):  # FSDP2: a shared parameter is one DTensor, its shard one storage
            tensor = tensor.to_local()
        if tensor.numel() == 0 or tensor.device.type == "meta":  # ZeRO 3 placeholders share no data
            continue
        key = (
            tensor.device,
            tensor.dtype,
            tensor.untyped_storage().data_ptr(),
            tensor.storage_offset(),
            tuple(tensor.shape),
            tensor.stride(),
        )
        if key in first:
            aliases[name] = first[key]
        else:
            first[key] = name
    return aliases


def deduplicated(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors to store (contiguous, on the CPU, each shared one once) and the file's metadata."""
    aliases = shared_names(state)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items() if k not in aliases}
    metadata = {"format": "pt"}  # what transformers writes; older versions refuse a file without it
    if aliases:
        metadata[ALIASES] = json.dumps(aliases, sort_keys=True)
    return tensors, metadata


def weights_bytes(state: Mapping[str, torch.Tensor]) -> bytes:
    """`state` as the bytes of a safetensors file, each shared tensor once (see `deduplicated`)."""
    tensors, metadata = deduplicated(state)
    return save(tensors, metadata=metadata)


def file_aliases(file: str | os.PathLike) -> dict[str, str]:
    """The `{alias: kept}` map a weights file records (empty for a file without shared tensors)."""
    with safe_open(file, framework="pt") as f:
        metadata = f.metadata() or {}
    return json.loads(metadata.get(ALIASES, "{}"))


def read_weights(file: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every name of a weights file, its aliases included: an alias is the very tensor of the name
    it shares, as in the model that was saved (loading copies into both, so a tie stays one)."""
    state = load_file(file)
    for alias, kept in file_aliases(file).items():
        if kept not in state:
            raise ValueError(f"{file}: alias {alias!r} names {kept!r}, which the file does not hold")
        state[alias] = state[kept]
    return state


def write_weights(models: dict[str, nn.Module], directory: str, engine: Engine) -> dict[str, str]:
    """`<directory>/<name>.safetensors` for each model, written aside then renamed; a collective
    (sharded weights are gathered), the main process writes. Returns each file's sha256 (main process)."""
    digests = {}
    for name, module in models.items():
        path = os.path.join(directory, f"{name}.safetensors")
        with engine.full_weights(module):
            if engine.is_main_process:
                digests[path] = write_bytes(path + ".tmp", weights_bytes(module.state_dict()))
                os.replace(path + ".tmp", path)
    return digests
