"""The DeepSpeed JSON of a run: the user's file, with every setting that decides the update taken
from the run config. A file that states one of those settings differently is refused.

DeepSpeed's own accumulation is switched off (`gradient_accumulation_steps: 1`): the accumulation
core forces the boundary on the last backward of each window and scales the losses itself, so no
division by a fixed count can apply, also not in the last, shorter window of an epoch.
"""

from __future__ import annotations

import json
import os
from typing import Any

from disttrain.config import Config, ConfigError


def deepspeed_config_path(cfg: Config) -> str:
    """The DeepSpeed JSON of this run: `deepspeed_config=` or the one `accelerate launch` announces."""
    if cfg.deepspeed_config:
        return cfg.deepspeed_config
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        path = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "")
        if not path:
            raise ConfigError(
                "the accelerate config selects DeepSpeed without a deepspeed_config_file; "
                "point it at one of configs/deepspeed/*.json"
            )
        return path
    return ""


def load_user_config(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise ConfigError(f"deepspeed_config={path}: no such file")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"deepspeed_config={path}: not valid JSON ({e})") from e


def zero_stage(cfg: Config) -> int | None:
    """The ZeRO stage of a DeepSpeed run (0 when its file names none); None without DeepSpeed."""
    if not cfg.deepspeed_config:
        return None
    return int(load_user_config(cfg.deepspeed_config).get("zero_optimization", {}).get("stage", 0))


def check_against_run(user: dict[str, Any], path: str, cfg: Config, world_size: int) -> None:
    """Refuse a DeepSpeed file that says something else than the run config about the update."""
    accumulation = cfg.accumulation_steps(world_size)
    meant = {
        "train_micro_batch_size_per_gpu": (cfg.micro_batch_size, "micro_batch_size"),
        "gradient_accumulation_steps": (accumulation, "global_batch_size / (micro_batch_size x processes)"),
        "train_batch_size": (cfg.global_batch_size, "global_batch_size"),
    }
    for key, (value, source) in meant.items():
        if key in user and user[key] != "auto" and user[key] != value:
            raise ConfigError(
                f"{path} sets {key}={user[key]} but the run config gives {value} ({source}); "
                f'set it to "auto" in {path}: the run config is the one source'
            )
    if "gradient_clipping" in user and user["gradient_clipping"] != "auto":
        raise ConfigError(
            f'{path} sets gradient_clipping={user["gradient_clipping"]}; set it to "auto": '
            "clipping comes from each optimizer's clip_grad_norm in the run config"
        )
    for precision in ("fp16", "bf16"):
        enabled = user.get(precision, {}).get("enabled", False)
        if enabled not in ("auto", False) and cfg.mixed_precision != precision:
            raise ConfigError(
                f"{path} enables {precision} but mixed_precision={cfg.mixed_precision}; "
                f'set mixed_precision={precision} in the run config and "enabled": "auto" in {path}'
            )
    stage = user.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"{path}: zero_optimization.stage={stage} is not one of 0, 1, 2, 3")


def engine_config(user: dict[str, Any], cfg: Config, world_size: int, clip_grad_norm: float) -> dict[str, Any]:
    """The dict given to `deepspeed.initialize` for one model."""
    ds = json.loads(json.dumps(user))  # a deep copy; each engine gets its own
    ds.update(
        train_micro_batch_size_per_gpu=cfg.micro_batch_size,
        gradient_accumulation_steps=1,
        train_batch_size=cfg.micro_batch_size * world_size,
        # DeepSpeed clips at 1.0 when the key is missing: always state it (0 turns clipping off).
        gradient_clipping=float(clip_grad_norm),
        zero_allow_untested_optimizer=True,
    )
    ds["fp16"] = {**ds.get("fp16", {}), "enabled": cfg.mixed_precision == "fp16"}
    ds["bf16"] = {**ds.get("bf16", {}), "enabled": cfg.mixed_precision == "bf16"}
    return ds
