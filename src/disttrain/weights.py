"""Full weights of models as safetensors files: the final export and every checkpoint's weights."""

from __future__ import annotations

import os

from safetensors.torch import save
from torch import nn

from disttrain.engines.base import Engine
from disttrain.safe_files import write_bytes


def write_weights(models: dict[str, nn.Module], directory: str, engine: Engine) -> dict[str, str]:
    """`<directory>/<name>.safetensors` for each model, written aside then renamed; a collective
    (sharded weights are gathered), the main process writes. Returns each file's sha256 (main process)."""
    digests = {}
    for name, module in models.items():
        path = os.path.join(directory, f"{name}.safetensors")
        with engine.full_weights(module):
            if engine.is_main_process:
                state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
                digests[path] = write_bytes(path + ".tmp", save(state))
                os.replace(path + ".tmp", path)
    return digests
