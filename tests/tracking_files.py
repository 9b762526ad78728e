"""Read back what a tracker wrote to disk: an offline W&B run's records, a TensorBoard run's events.

A `.wandb` file is a 7-byte header (`:W&B`, a 2-byte magic, a version byte) followed by a
LevelDB-style log: 32 KiB blocks of chunks, each `crc32 (4) | length (2) | type (1) | data`, where the
CRC covers the type byte and the data, and a record too long for a block is split into FIRST, MIDDLE
and LAST chunks. Each record is a `wandb.proto.wandb_internal_pb2.Record`.
"""

from __future__ import annotations

import glob
import json
import os
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

_HEADER = 7
_BLOCK = 32 * 1024
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


@dataclass
class WandbRun:
    """One `.wandb` file: a run, or one resumed segment of it."""

    path: str
    run_id: str = ""
    project: str = ""
    name: str = ""
    group: str = ""
    tags: list[str] = field(default_factory=list)
    notes: str = ""
    resumed: bool = False
    config: dict[str, Any] = field(default_factory=dict)
    history: dict[str, dict[int, Any]] = field(default_factory=dict)  # metric -> {step: value}
    exit_code: int | None = None  # None: the run never finished

    def steps(self, metric: str) -> list[int]:
        return sorted(self.history.get(metric, {}))


def wandb_records(path: str) -> Iterator[Any]:
    """The records of a `.wandb` file in order; a damaged chunk raises."""
    from wandb.proto import wandb_internal_pb2

    with open(path, "rb") as f:
        data = f.read()
    if data[:4] != b":W&B":
        raise ValueError(f"{path}: not a W&B run file (header {data[:_HEADER]!r})")
    pos, pending = _HEADER, b""
    while pos + _HEADER <= len(data):
        if _BLOCK - pos % _BLOCK < _HEADER:  # the rest of a block too short for a chunk header is padding
            pos += _BLOCK - pos % _BLOCK
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + _HEADER])
        chunk = data[pos + _HEADER : pos + _HEADER + length]
        pos += _HEADER + length
        if kind == 0 and length == 0:  # zero padding at a block's end
            continue
        if zlib.crc32(bytes([kind]) + chunk) != crc:
            raise ValueError(f"{path}: bad checksum in the chunk ending at byte {pos}")
        pending = chunk if kind in (_FULL, _FIRST) else pending + chunk
        if kind in (_FULL, _LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def _item_key(item: Any) -> str:
    return item.key or "/".join(item.nested_key)


def read_wandb_run(path: str) -> WandbRun:
    run = WandbRun(path)
    for record in wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            r = record.run
            run.run_id, run.project, run.name, run.group = r.run_id, r.project, r.display_name, r.run_group
            run.tags, run.notes, run.resumed = list(r.tags), r.notes, r.resume
        elif kind == "config":
            run.config.update({_item_key(i): json.loads(i.value_json) for i in record.config.update})
        elif kind == "history":
            step = record.history.step.num
            for item in record.history.item:
                # A media value arrives as one item per field: nested_key ["samples", "_type"], ...
                key, *inner = list(item.nested_key) or [item.key]
                if key.startswith("_"):  # wandb's own _step, _runtime, _timestamp
                    continue
                value = json.loads(item.value_json)
                if inner:
                    run.history.setdefault(key, {}).setdefault(step, {})["/".join(inner)] = value
                else:
                    run.history.setdefault(key, {})[step] = value
        elif kind == "exit":
            run.exit_code = record.exit.exit_code
    run.config.pop("_wandb", None)
    return run


def wandb_runs(run_dir: str) -> list[WandbRun]:
    """Every offline W&B run file under `<run_dir>/wandb`, oldest first (a resume adds one)."""
    paths = glob.glob(os.path.join(run_dir, "wandb", "offline-run-*", "run-*.wandb"))
    return [read_wandb_run(p) for p in sorted(paths, key=lambda p: os.path.basename(os.path.dirname(p)))]


def tensorboard_events(log_dir: str) -> tuple[dict[str, dict[int, float]], dict[str, list[int]]]:
    """Scalars ({tag: {step: value}}) and images ({tag: [steps]}) of the event files in `log_dir`."""
    from tensorboard.backend.event_processing.event_accumulator import IMAGES, SCALARS, EventAccumulator

    events = EventAccumulator(log_dir, size_guidance={SCALARS: 0, IMAGES: 0})
    events.Reload()
    tags = events.Tags()
    scalars = {t: {e.step: e.value for e in events.Scalars(t)} for t in tags[SCALARS]}
    images = {t: [e.step for e in events.Images(t)] for t in tags[IMAGES]}
    return scalars, images
