"""Resumable checkpoints: what a run needs to continue bit-for-bit, published atomically, read back safely.

Layout of `<run dir>/checkpoints/step-00001000/`:
  models/<name>.safetensors   full weights of every exported model (EMA included)
  optimizers.pt               DDP engine: each optimizer's state (identical on every process)
  deepspeed/<model>/          DeepSpeed engine: each engine's own (partitioned) checkpoint
  trainer.pt                  the trainer's state: step, schedulers, gradient scaler, counters...
  rng/rank-<r>.pt             every process's random generators
  config.yaml                 the run's resolved config, to refuse an incompatible resume
  manifest.json               written last: every file, its size and its sha256

Everything is written into `step-XXXXXXXX.tmp/` and published by renaming the directory, so a kill
at any moment leaves either a complete checkpoint or none. `.pt` files are read with
`torch.load(weights_only=True)`: tensors and plain containers only, never arbitrary objects.

This module works on explicit state: the engine (its part of the checkpoint), the models whose full
weights are kept, and the trainer's state as a plain dict. It knows no trainer.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import random
import re
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn
from torch.distributed import ProcessGroup

from disttrain.config import Config, flat_items, processes, to_yaml
from disttrain.engines.base import Engine
from disttrain.safe_files import (
    CheckpointError,
    copied_for_later,
    file_sha256,
    safe_load,
    serialized_now,
    torch_bytes,
    write_bytes,
)
from disttrain.weights import read_weights, shared_names, weights_bytes

MANIFEST = "manifest.json"
_NAME = re.compile(r"^step-(\d{8})$")

# Keys that may differ between the run that wrote a checkpoint and the one resuming it: they change
# how a run is observed, launched or stored, not the update it computes. micro_batch_size is among
# them because accumulation follows from it exactly: the update does not depend on it.
RESUMABLE_CHANGES = (
    "micro_batch_size",
    "eval_every",
    "log_every",
    "output_dir",
    "run_name",
    "save_weights",
    "progress_bar",
    "checkpoint_every",
    "keep_checkpoints",
    "checkpoint_async",
    "resume",
    "on_nonfinite",
    "collective_timeout_s",
    "stall_timeout_s",
    "data_timeout_s",
    "stop_grace_s",
    "tracker",
    "wandb",
    "data",  # how micro-batches are loaded, not which
    "debug",  # a rehearsed failure: the run it interrupts resumes
    "fsdp.reshard_after_forward",  # memory against communication; the same gradients
    "fsdp.sync_every_micro_batch",
    "fsdp.cpu_offload",
)


# --------------------------------------------------------------------------- finding checkpoints


def checkpoints_dir(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


def complete_checkpoints(run_dir: str) -> list[str]:
    """Published checkpoints of a run, oldest first (an unpublished `.tmp` is never one)."""
    root = checkpoints_dir(run_dir)
    if not os.path.isdir(root):
        return []
    names = sorted(n for n in os.listdir(root) if _NAME.match(n))
    return [os.path.join(root, n) for n in names]


def remove_unpublished(run_dir: str) -> None:
    """Drop what a killed run left half-written or half-deleted. Main process only."""
    root = checkpoints_dir(run_dir)
    if os.path.isdir(root):
        for name in os.listdir(root):
            if name.endswith((".tmp", ".deleting")):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def set_aside_later(run_dir: str, resumed: str, step: int) -> str | None:
    """Move the run's checkpoints at or after `step` (other than `resumed` itself) into
    `checkpoints/superseded-<time>/`: a run resumed from an older checkpoint writes those steps again,
    and `resume=auto` must find its own newest, not the abandoned branch's. Nothing is deleted: moving
    them back returns to that branch. Main process only; returns the folder, or None if nothing moved."""
    keep = os.path.realpath(resumed)
    later = [
        p
        for p in complete_checkpoints(run_dir)
        if int(_NAME.match(os.path.basename(p)).group(1)) >= step and os.path.realpath(p) != keep
    ]
    if not later:
        return None
    aside = os.path.join(checkpoints_dir(run_dir), "superseded-" + time.strftime("%Y%m%d-%H%M%S"))
    suffix = 0
    while os.path.exists(aside + (f"-{suffix}" if suffix else "")):
        suffix += 1
    aside += f"-{suffix}" if suffix else ""
    os.makedirs(aside)
    for path in later:
        os.rename(path, os.path.join(aside, os.path.basename(path)))
    _fsync(checkpoints_dir(run_dir))
    return aside


def prune(run_dir: str, keep: int) -> None:
    """Keep the newest `keep` checkpoints. Renamed before deletion, so a kill mid-way never leaves a
    partly deleted directory under a published name. Main process only."""
    for path in complete_checkpoints(run_dir)[:-keep]:
        os.rename(path, path + ".deleting")
        shutil.rmtree(path + ".deleting", ignore_errors=True)


# --------------------------------------------------------------------------- writing


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (full disk, I/O error); raised on every process alike."""


def save_checkpoint(
    run_dir: str, step: int, engine: Engine, models: dict[str, nn.Module], state: dict[str, Any], cfg: Config
) -> str:
    """Write the state after `step` optimizer steps; a collective: every process calls it.

    `models` are the modules whose full weights are kept (the recipe's exported models), `state` the
    trainer's own state (tensors and plain containers). A write that fails on any process (a full
    disk) fails on every process with that process's reason, and leaves the previous checkpoint
    the newest complete one.
    """
    staged = stage_checkpoint(run_dir, step, engine, models, state, cfg)
    return write_staged(staged, engine, cfg.keep_checkpoints, engine.gather_objects, engine.wait_for_everyone)


@dataclass
class Staged:
    """A checkpoint taken from the training state, not yet on disk: this process's files (each as
    the function that makes its bytes, from a copy when training goes on meanwhile), and the parts
    every process writes together: the engine's, and sharded weights gathered in the background."""

    run_dir: str
    step: int
    files: dict[str, Callable[[], bytes]]
    parts: list[Callable[[], dict[str, str]]]  # what every process writes together (collectives inside)
    failure: str = ""  # why its directory could not be made (the write then fails on every process)

    @property
    def final(self) -> str:
        return os.path.join(checkpoints_dir(self.run_dir), f"step-{self.step:08d}")


def stage_checkpoint(
    run_dir: str,
    step: int,
    engine: Engine,
    models: dict[str, nn.Module],
    state: dict[str, Any],
    cfg: Config,
    background: bool = False,
    group: ProcessGroup | None = None,
) -> Staged:
    """The checkpoint of the state after `step`, ready to write; a collective (the space check, the
    directory, gathered weights). With `background` the engine's part is copied to host memory now,
    so that `write_staged` may run in another thread while training goes on, its collectives over
    `group` (None: one process); without, the engine writes its live state then."""
    main = engine.is_main_process
    final = os.path.join(checkpoints_dir(run_dir), f"step-{step:08d}")
    tmp = final + ".tmp"
    try:
        refusal = _space_refusal(run_dir, final, models) if main else ""
    except OSError as e:  # the disk turned read-only or failed: every process hears why
        refusal = f"checkpoint step-{step:08d} not written: {disk_error(e, checkpoints_dir(run_dir))}"
    refusal = engine.share_from_main(refusal)
    if refusal:
        raise CheckpointWriteError(refusal)
    failure = ""
    try:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
            for sub in ("models", "rng"):
                os.makedirs(os.path.join(tmp, sub))
    except OSError as e:
        failure = disk_error(e, tmp)
    engine.wait_for_everyone()
    kept = copied_for_later if background else serialized_now
    files = {os.path.join(tmp, "rng", f"rank-{engine.rank}.pt"): kept(_rng_state(), torch_bytes)}
    gathered_later = {}
    for name, module in models.items():
        path = os.path.join(tmp, "models", f"{name}.safetensors")
        later = engine.full_weights_later(module, group) if background else None
        if later is not None:  # shards copied now, gathered by the writing thread
            gathered_later[path] = later
            continue
        with engine.full_weights(module):  # a collective where weights are sharded
            if main:
                files[path] = kept(module.state_dict(), weights_bytes)
    if main:
        files[os.path.join(tmp, "trainer.pt")] = kept(state, torch_bytes)
        files[os.path.join(tmp, "config.yaml")] = serialized_now(cfg, lambda c: to_yaml(c).encode())
    # The engine's part first: DCP's own thread may be using `group` until that part has waited for it,
    # and two threads in collectives over one group would pair each other's messages.
    parts = [engine.save_state_later(tmp, group) if background else functools.partial(engine.save_state, tmp)]
    if gathered_later:
        parts.append(functools.partial(_write_gathered, gathered_later))
    return Staged(run_dir, step, files, parts, failure)


def _write_gathered(weights: dict[str, Callable[[], dict[str, torch.Tensor]]]) -> dict[str, str]:
    """Full weights gathered now (a collective over the writer's group), written by the main process."""
    digests = {}
    for path, gather in weights.items():
        state = gather()
        if state:  # the main process's
            digests[path] = write_bytes(path, weights_bytes(state))
    return digests


def write_staged(
    staged: Staged,
    engine: Engine,
    keep: int,
    gather: Callable[[Any], list[Any]],
    barrier: Callable[[], None],
) -> str:
    """Write a staged checkpoint and publish it (main process); every process calls it, with
    `gather` and `barrier` over the process group it runs in (the training one, or the background
    writer's own). Returns the published path; raises CheckpointWriteError on every process alike."""
    main, final, step = engine.is_main_process, staged.final, staged.step
    tmp = final + ".tmp"
    failure, digests = staged.failure, {}
    try:
        for path, data in staged.files.items():
            digests[path] = write_bytes(path, data())
    except OSError as e:
        failure = failure or disk_error(e, tmp)
    for part in staged.parts:
        try:
            # Collectives inside (DeepSpeed's own save, DCP's plan, gathering): every process takes
            # part in each; a failed write is reported after them, so no process waits for one that gave up.
            digests.update(part())
        except OSError as e:
            failure = failure or disk_error(e, tmp)
    failures = gather(failure)  # also the barrier before publishing
    if any(failures):
        rank, reason = next((r, f) for r, f in enumerate(failures) if f)
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        where = "" if rank == engine.rank else f"process {rank} failed: "
        raise CheckpointWriteError(f"checkpoint step-{step:08d} not written: {where}{reason}")

    if main:
        files = {
            os.path.relpath(p, tmp): {"bytes": os.path.getsize(p), "sha256": digests.get(p) or file_sha256(p)}
            for p in _files(tmp)
        }
        manifest = {"step": step, "world_size": engine.world_size, "files": files}
        with open(os.path.join(tmp, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=1, sort_keys=True)
        for path in _files(tmp):  # on disk before the rename publishes them (power loss, not just kill)
            _fsync(path)
        os.rename(tmp, final)
        _fsync(os.path.dirname(final))
        prune(staged.run_dir, keep)
    barrier()
    return final


# A disk that cannot take what a run writes: said in one line, not a traceback.
DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO)


def disk_error(e: OSError, where: str) -> str:
    """What went wrong writing `where` (the file the error names if it names one), in one line."""
    if e.errno == errno.ENOSPC:
        free = shutil.disk_usage(os.path.dirname(where)).free if os.path.isdir(os.path.dirname(where)) else 0
        return f"no space left on device writing {e.filename or where} ({free / 2**20:.1f} MiB free there)"
    return f"{e.strerror or e} writing {e.filename or where}"


def _space_refusal(run_dir: str, final: str, models: dict[str, nn.Module]) -> str:
    """Why a checkpoint cannot fit on its disk, before writing it; empty when it can.

    Its size is the newest checkpoint's; before the first, the weights with two optimizer moments
    each (Adam). Pruning runs after the new checkpoint is published, so that much must be free.
    """
    os.makedirs(checkpoints_dir(run_dir), exist_ok=True)
    found = complete_checkpoints(run_dir)
    if found:
        needed = sum(os.path.getsize(p) for p in _files(found[-1]))
    else:
        needed = 3 * sum(_weight_bytes(m.state_dict()) for m in models.values())
    free = shutil.disk_usage(checkpoints_dir(run_dir)).free
    if needed <= free:
        return ""
    return (
        f"checkpoint {os.path.basename(final)} needs about {needed / 2**20:.1f} MiB and "
        f"{checkpoints_dir(run_dir)} has {free / 2**20:.1f} MiB free; free space there or lower keep_checkpoints "
        "(a run needs room for keep_checkpoints + 1 checkpoints and the final weights)"
    )


def _weight_bytes(state: dict[str, torch.Tensor]) -> int:
    aliases = shared_names(state)  # a tied tensor is stored once
    return sum(t.numel() * t.element_size() for k, t in state.items() if k not in aliases)


def _files(root: str) -> Iterator[str]:
    for directory, _, names in os.walk(root):
        for name in names:
            yield os.path.join(directory, name)


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _rng_state() -> dict[str, Any]:
    import numpy as np

    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.copy()), pos, has_gauss, cached),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy(), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------- reading


class CheckpointDamaged(CheckpointError):
    """A checkpoint whose files are not what its manifest recorded."""


def verify(path: str, checksums: bool = True) -> dict[str, Any]:
    """The manifest of a complete checkpoint, after checking that every file it lists is whole:
    its size, and (with `checksums`) its sha256. Raises CheckpointDamaged naming the file."""
    manifest_path = os.path.join(path, MANIFEST)
    if not os.path.isfile(manifest_path):
        raise CheckpointDamaged(f"{path} has no {MANIFEST}: it is not a complete checkpoint")
    try:
        with open(manifest_path) as f:
            manifest = json.load(f)
        recorded = {rel: (int(entry["bytes"]), str(entry["sha256"])) for rel, entry in manifest["files"].items()}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointDamaged(f"{manifest_path} is unreadable ({e})") from e
    for rel, (size, digest) in recorded.items():
        file = os.path.join(path, rel)
        actual = os.path.getsize(file) if os.path.isfile(file) else None
        if actual != size:
            found = "missing" if actual is None else f"{actual} bytes, {size} expected"
            raise CheckpointDamaged(f"checkpoint {path} is damaged: {rel} is {found}")
        if checksums and file_sha256(file) != digest:
            raise CheckpointDamaged(
                f"checkpoint {path} is damaged: {rel} does not match its recorded checksum (its bytes changed)"
            )
    return manifest


def verified_by_main(path: str, engine: Engine) -> dict[str, Any]:
    """`verify` with sizes on every process and checksums read once, on the main process."""
    manifest = verify(path, checksums=False)
    problem = ""
    if engine.is_main_process:
        try:
            verify(path)
        except CheckpointDamaged as e:
            problem = str(e)
    problem = engine.share_from_main(problem)
    if problem:
        raise CheckpointDamaged(problem)
    return manifest


def newest_intact(paths: list[str], engine: Engine) -> str | None:
    """The newest of `paths` whose files all match their manifest (a collective)."""
    for path in reversed(paths):
        try:
            verified_by_main(path, engine)
        except CheckpointDamaged:
            continue
        return path
    return None


def damaged_hint(path: str, engine: Engine, newest_of_run: bool) -> str:
    """What to do about a damaged checkpoint: name the newest intact older one of its run."""
    name = os.path.basename(os.path.normpath(path))
    older = [p for p in complete_checkpoints(run_dir_of(path)) if os.path.basename(p) < name]
    intact = newest_intact(older, engine)
    if intact is None:
        return "no older checkpoint of this run is intact; start afresh with resume=never and another run_name"
    if newest_of_run:  # resume=auto: never fall back silently
        return f"the newest intact one is {intact}; continue from it with resume={intact}"
    return f"resume from an older one with resume={intact} (the newest intact one)"


def run_dir_of(path: str) -> str:
    return os.path.dirname(os.path.dirname(os.path.normpath(path)))


def incompatibilities(saved: Config | dict, current: Config) -> list[str]:
    """`key: saved -> current` for every setting that changes the update and differs."""
    old = flat_items(OmegaConf.to_container(OmegaConf.create(to_yaml(saved) if isinstance(saved, Config) else saved)))
    new = flat_items(OmegaConf.to_container(OmegaConf.structured(current)))
    # A key a later version added is absent from an older checkpoint: at its default it changes nothing.
    defaults = flat_items(OmegaConf.to_container(OmegaConf.structured(type(current))))
    for key in new.keys() - old.keys():
        if key in defaults and new[key] == defaults[key]:
            old[key] = new[key]
    free = lambda key: any(key == k or key.startswith(k + ".") for k in RESUMABLE_CHANGES)  # noqa: E731
    keys = sorted((old.keys() | new.keys()) - {k for k in old.keys() | new.keys() if free(k)})
    return [f"{k}: {old.get(k, '<absent>')} -> {new.get(k, '<absent>')}" for k in keys if old.get(k) != new.get(k)]


@dataclass
class Restored:
    state: dict[str, Any]  # the trainer's state, as given to save_checkpoint
    note: str = ""  # what the resume could not restore exactly, for the run's output


def load_checkpoint(path: str, engine: Engine, models: dict[str, nn.Module], cfg: Config) -> Restored:
    """Restore a checkpoint into the built engine and models; every process calls it.

    Refuses, naming what differs, a checkpoint of another configuration.
    """
    manifest = verified_by_main(path, engine)
    with open(os.path.join(path, "config.yaml")) as f:
        saved = OmegaConf.to_container(OmegaConf.load(f))
    differences = incompatibilities(saved, cfg)
    if differences:
        raise CheckpointError(
            f"checkpoint {path} was written by a run with other settings ({'; '.join(differences)}); "
            "set them back to resume it, or start fresh with resume=never (and another run_name)"
        )
    saved_world = manifest["world_size"]
    engine.check_resumable(saved_world, path)
    for name, module in models.items():
        if not engine.restores_weights(name):
            _load_weights(module, os.path.join(path, "models", f"{name}.safetensors"), path)
    engine.load_state(path)
    state = safe_load(os.path.join(path, "trainer.pt"), path)
    if saved_world == engine.world_size:
        _set_rng_state(safe_load(os.path.join(path, "rng", f"rank-{engine.rank}.pt"), path))
        return Restored(state)
    # The data order depends on the step alone; only random streams inside the models (dropout)
    # are per process and cannot be mapped to another process count.
    torch.manual_seed(cfg.seed + 1_000_003 * state["step"] + engine.rank)
    resharded = "its FSDP2 shards are resharded to them; " if engine.name == "fsdp" else ""
    random = any(_draws_randomly(m) for m in [*models.values(), *engine.models.values()])
    continues = (
        "random streams (dropout) are reseeded, so the run continues exactly only in distribution"
        if random
        else "the updates continue as they would have, but for float rounding (sums in another order)"
    )
    return Restored(
        state,
        f"checkpoint {path} was written by {processes(saved_world)}, this run has {engine.world_size}: "
        f"{resharded}{continues}",
    )


def _draws_randomly(model: nn.Module) -> bool:
    """Whether `model` holds a dropout layer that drops anything (its stream is per process)."""
    return any(isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0 for m in model.modules())


def _load_weights(module: torch.nn.Module, file: str, path: str) -> None:
    rel = os.path.relpath(file, path)
    try:
        state = read_weights(file)
    except Exception as e:
        raise CheckpointError(f"checkpoint {path}: {rel} is unreadable ({e})") from e
    own = module.state_dict(keep_vars=True)
    missing, unexpected = own.keys() - state.keys(), state.keys() - own.keys()
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {path}: {rel} does not fit the model "
            f"(missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]})"
        )
    # A tie the file and the model do not share would load without error and then train two
    # tensors where the saved run trained one (or the reverse): the resume would not be that run.
    saved_ties, model_ties = _tie_groups(shared_names(state)), _tie_groups(shared_names(module.state_dict()))
    if saved_ties != model_ties:
        raise CheckpointError(
            f"checkpoint {path}: {rel} ties {_described(saved_ties)}, the model ties {_described(model_ties)}"
        )
    with torch.no_grad():
        for key, value in own.items():
            if value.shape != state[key].shape:
                raise CheckpointError(
                    f"checkpoint {path}: {key} has shape {tuple(state[key].shape)}, the model {tuple(value.shape)}"
                )
            value.copy_(state[key])  # in place: tied names stay one tensor


def _tie_groups(aliases: dict[str, str]) -> set[frozenset[str]]:
    groups: dict[str, set[str]] = {}
    for alias, kept in aliases.items():
        groups.setdefault(kept, {kept}).add(alias)
    return {frozenset(g) for g in groups.values()}


def _described(groups: set[frozenset[str]]) -> str:
    return "; ".join(sorted(" = ".join(sorted(g)) for g in groups)) or "nothing"
