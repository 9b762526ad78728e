"""Experiment tracking: which tracker a run logs to, and that one run (W&B or TensorBoard) on the main process.

Accelerate's trackers do the work. What this module adds: the W&B mode resolved before the run starts
(offline with one line when there is no API key, instead of wandb's crash), the W&B run id to keep in
checkpoints so a resumed or requeued run continues the same W&B run, and one place that knows the
tracker names. Nothing here imports torch at module level, so `check_tracker` can run while the config
is validated, before train.py imports torch.
"""

from __future__ import annotations

import importlib.util
import logging
import netrc
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from omegaconf import OmegaConf

from disttrain.config import Config, ConfigError, flat_items

if TYPE_CHECKING:
    from accelerate import Accelerator

log = logging.getLogger("disttrain")

# Accelerate's TensorBoard tracker falls back to tensorboardX when tensorboard is missing.
_PACKAGES = {"wandb": ("wandb",), "tensorboard": ("tensorboard", "tensorboardX")}
_TENSORBOARD_DIR = "tensorboard"  # under the run directory
_WANDB_HOST = "https://api.wandb.ai"


def check_tracker(cfg: Config) -> None:
    """Refuse, in one line naming the pip command, a tracker whose package is not installed.

    Accelerate would only warn and train without any tracking.
    """
    if cfg.tracker == "none":
        return
    if not any(importlib.util.find_spec(name) is not None for name in _PACKAGES[cfg.tracker]):
        install = (
            "make install" if cfg.tracker == "wandb" else f"make install EXTRAS={cfg.tracker}"
        )  # wandb: a base dependency
        raise ConfigError(
            f"tracker={cfg.tracker} needs the {cfg.tracker} package: {install} (it keeps the pinned torch), "
            "or choose tracker=none to train without tracking"
        )


def has_wandb_api_key() -> bool:
    """Whether wandb will find credentials where it looks: WANDB_API_KEY, an identity token file,
    or a netrc entry for the W&B host ($NETRC, else ~/.netrc, else ~/_netrc)."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlsplit(os.environ.get("WANDB_BASE_URL") or _WANDB_HOST).netloc
    path = os.environ.get("NETRC") or next(
        (p for p in (os.path.expanduser("~/.netrc"), os.path.expanduser("~/_netrc")) if os.path.exists(p)), None
    )
    if not host or path is None:
        return False
    try:
        entry = netrc.netrc(os.path.expanduser(path)).authenticators(host)
    except (OSError, netrc.NetrcParseError):  # wandb, too, reads an unreadable file as no key
        return False
    return bool(entry and entry[2])


def wandb_mode(cfg: Config) -> tuple[str, str]:
    """The W&B mode (online, offline or disabled) and what decided it.

    `wandb.mode`, else WANDB_MODE, else online with an API key and offline without one: wandb itself
    would stop the run with "No API key configured".
    """
    if cfg.wandb.mode:
        return cfg.wandb.mode, "wandb.mode"
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"], "WANDB_MODE"
    if has_wandb_api_key():
        return "online", "API key"
    return "offline", "no API key"


def log_with(cfg: Config) -> list[str] | None:
    """What `Accelerator(log_with=...)` gets: no tracker at all for tracker=none or a disabled W&B run."""
    check_tracker(cfg)
    if cfg.tracker == "none" or (cfg.tracker == "wandb" and wandb_mode(cfg)[0] == "disabled"):
        return None
    return [cfg.tracker]


def accelerator_kwargs(cfg: Config) -> dict[str, Any]:
    """Tracking's arguments for the Accelerator: `Accelerator(..., **accelerator_kwargs(cfg))`."""
    trackers = log_with(cfg)
    kwargs: dict[str, Any] = {"log_with": trackers}
    if trackers == ["tensorboard"]:
        from accelerate.utils import ProjectConfiguration

        # Accelerate refuses TensorBoard without a logging directory when it is built, which is before
        # the run directory is named; Tracking.start points it at the run directory.
        kwargs["project_config"] = ProjectConfiguration(logging_dir=cfg.output_dir)
    return kwargs


def resolved_config(cfg: Config) -> dict[str, Any]:
    """The run's config as the nested plain dict that config.yaml holds."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


def _scalars(flat: Mapping[str, Any]) -> dict[str, Any]:
    """TensorBoard's hyperparameters take no lists or None: those become strings."""
    return {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in flat.items()}


class Tracking:
    """The run's tracker, started on every process; only the main process holds a run and logs."""

    def __init__(self, accelerator: Accelerator, kind: str | None, run_id: str | None):
        self.accelerator = accelerator
        self.kind = kind  # "wandb", "tensorboard" or None
        self.run_id = run_id  # the W&B run id, on every process; keep it in checkpoints
        self._open = kind is not None and accelerator.is_main_process

    @classmethod
    def start(
        cls,
        cfg: Config,
        accelerator: Accelerator,
        run_dir: str,
        run_name: str | None = None,
        run_id: str | None = None,
    ) -> Tracking:
        """Open the run; every process must call this (the W&B run id is shared by a broadcast).

        `run_id` (from a checkpoint) continues that W&B run; the run name defaults to the run
        directory's name, the group to the SLURM job id. The resolved config is uploaded.
        """
        kinds = [str(t) for t in accelerator.log_with]
        wanted = log_with(cfg)
        if kinds != (wanted or []):
            raise RuntimeError(
                f"tracker={cfg.tracker} but the Accelerator was built with log_with={kinds}: "
                "build it with Accelerator(..., **tracking.accelerator_kwargs(cfg))"
            )
        kind = kinds[0] if kinds else None
        run_name = run_name or os.path.basename(os.path.normpath(run_dir))
        found_id = None
        if kind == "wandb" and accelerator.is_main_process:
            found_id = cls._start_wandb(cfg, accelerator, run_dir, run_name, run_id)
        elif kind == "tensorboard" and accelerator.is_main_process:
            accelerator.project_configuration.logging_dir = run_dir
            accelerator.init_trackers(_TENSORBOARD_DIR, config=_scalars(flat_items(resolved_config(cfg))))
        if kind == "wandb" and accelerator.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            shared = [found_id]
            broadcast_object_list(shared, from_process=0)
            found_id = shared[0]
        return cls(accelerator, kind, found_id)

    @staticmethod
    def _start_wandb(cfg: Config, accelerator: Accelerator, run_dir: str, run_name: str, run_id: str | None) -> str:
        mode, decided_by = wandb_mode(cfg)
        if decided_by == "no API key":
            wandb_dir = os.path.join(run_dir, "wandb")
            log.warning(
                f"W&B: no API key (WANDB_API_KEY or `wandb login`), so this run logs offline to {wandb_dir}; "
                f"upload it later with `wandb sync {wandb_dir}/offline-run-*` "
                "(wandb.mode=offline silences this line, tracker=none turns tracking off)"
            )
        group = cfg.wandb.group or os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ.get("SLURM_JOB_ID")
        init: dict[str, Any] = {
            "dir": run_dir,
            "name": run_name,
            "mode": mode,
            "entity": cfg.wandb.entity or None,
            "group": group or None,
            "tags": [str(t) for t in cfg.wandb.tags] or None,
            "notes": cfg.wandb.notes or None,
        }
        if run_id:
            # Offline, wandb writes a new offline-run-<time>-<id> directory marked as a resume;
            # `wandb sync` uploads such directories of one run in order of start time.
            init.update(id=run_id, resume="allow")
        accelerator.init_trackers(cfg.wandb.project, config=resolved_config(cfg), init_kwargs={"wandb": init})
        return accelerator.get_tracker("wandb", unwrap=True).id

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        """Scalars at optimizer step `step`; tensors are converted (TensorBoard would drop them silently)."""
        if self._open:
            self.accelerator.log({k: float(v) for k, v in metrics.items()}, step=step)

    def log_image(self, key: str, path: str, step: int) -> None:
        """A PNG file (the GAN's sample scatter) at optimizer step `step`."""
        if not self._open:
            return
        if self.kind == "wandb":
            import wandb

            self.accelerator.get_tracker("wandb", unwrap=True).log({key: wandb.Image(path)}, step=step)
        else:
            import numpy as np
            from PIL import Image

            with Image.open(path) as image:
                pixels = np.asarray(image.convert("RGB"))
            writer = self.accelerator.get_tracker("tensorboard", unwrap=True)
            writer.add_image(key, pixels, global_step=step, dataformats="HWC")
            writer.flush()

    def finish(self, exit_code: int = 0) -> None:
        """Close the run (W&B marks a non-zero exit code as failed); its files are complete on return.
        Safe to call twice.

        Not `accelerator.end_training()`: that also destroys the process group, which the trainer
        still needs for its last barrier.
        """
        if not self._open:
            return
        self._open = False
        for tracker in self.accelerator.trackers:
            if tracker.name == "wandb":
                import wandb

                tracker.tracker.finish(exit_code=exit_code)
                # finish() returns before wandb's service has written (offline) or uploaded (online)
                # everything; its atexit hook would wait, but a job step ending (SLURM) or a
                # multiprocessing child exiting skips it. teardown() waits for the service to stop.
                wandb.teardown()
            else:
                tracker.finish()
        self.accelerator.trackers.clear()

    def __enter__(self) -> Tracking:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        self.finish(exit_code=0 if exc_type is None else 1)
