"""BENCHMARKS.json, the raw results BENCHMARKS.md is rendered from: per section, its result (or its
error), its wall time, whether it ran in quick mode, and the environment it was measured in.

    {"format": 2, "results": {section: ...}, "errors": {section: "..."}, "seconds": {section: s},
     "quick": {section: bool}, "environments": {section: {machine, date, commit, versions, ...}}}

A file written before sections kept their own environment (one top-level "environment" and one
"quick" for the whole run) reads as every section of that run having that environment.
"""

from __future__ import annotations

import copy
import json
import os
from typing import Any

FORMAT = 2
PER_SECTION = ("results", "errors", "seconds", "quick", "environments")


def sections_of(saved: dict[str, Any]) -> list[str]:
    """The sections `saved` has anything for, in the order they were first written."""
    names: dict[str, None] = {}
    for key in ("results", "errors", "seconds"):
        names.update(dict.fromkeys(saved.get(key, {})))
    return list(names)


def per_section(saved: dict[str, Any]) -> dict[str, Any]:
    """`saved` in the per-section form, whichever form it was written in (a copy)."""
    one_run = isinstance(saved.get("quick"), bool) or "environment" in saved
    out: dict[str, Any] = {
        "format": FORMAT,
        **{key: dict(saved.get(key) or {}) for key in PER_SECTION if key != "quick"},
    }
    if one_run:
        out["quick"] = dict.fromkeys(sections_of(saved), bool(saved.get("quick")))
        out["environments"] = {name: dict(saved.get("environment", {})) for name in sections_of(saved)}
    else:
        out["quick"] = dict(saved.get("quick") or {})
    return out


def skipped(result: Any) -> bool:
    """A section that measured nothing for want of hardware or a package (no GPU, no Lightning)."""
    return isinstance(result, dict) and set(result) == {"skipped"}


def merge(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """`old` with every section of `new` in place of its own; the other sections of `old` untouched.

    A section that succeeds now drops its old error. One that fails now keeps its earlier figures,
    if it has any, with their environment, beside the new error (the report says both). One skipped
    now (no GPU here) keeps its earlier figures: a CPU machine has nothing to say about a GPU's.
    """
    merged, new = copy.deepcopy(per_section(old)), per_section(new)
    for name in sections_of(new):
        had_figures = name in merged["results"] and not skipped(merged["results"][name])
        if had_figures and name in new["results"] and skipped(new["results"][name]):
            continue
        if had_figures and name not in new["results"]:  # failed now: keep what the last success measured
            merged["errors"][name] = new["errors"].get(name, "no result")
            continue
        for key in PER_SECTION:
            if name in new[key]:
                merged[key][name] = new[key][name]
            else:
                merged[key].pop(name, None)
    return merged


def load(path: str) -> dict[str, Any]:
    """The results saved at `path`, per section; none if there is no such file yet."""
    if not os.path.exists(path):
        return per_section({})
    with open(path) as f:
        return per_section(json.load(f))


def save(path: str, saved: dict[str, Any]) -> None:
    """Written whole, then moved in place: an interrupted run leaves the previous file intact."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(saved, f, indent=1)
        f.write("\n")
    os.replace(path + ".tmp", path)
