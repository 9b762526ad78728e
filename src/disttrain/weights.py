"""Full weights of models as safetensors files: the final export and every checkpoint's weights."""

from __future__ import annotations

import os

from safetensors.torch import save_file
from torch import nn

from disttrain.engines.base import Engine


def write_weights(models: dict[str, nn.Module], directory: str, engine: Engine) -> list[str]:
    """`<directory>/<name>.safetensors` for each model, written aside then renamed; a collective
    (sharded weights are gathered), the main process writes."""
    paths = []
    for name, module in models.items():
        path = os.path.join(directory, f"{name}.safetensors")
        paths.append(path)
        with engine.full_weights(module):
            if engine.is_main_process:
                state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
                save_file(state, path + ".tmp")
                os.replace(path + ".tmp", path)
    return paths
