"""Training: data (packing, square averaging), losses, the one trainer loop, the stages and the recipe.

A stage is a module with `build_stage(model, data: dict | None) -> Stage` (see tessera.train.stage for the
Stage protocol); `STAGES` names them for `tessera train STAGE` and the recipe. Add a stage by adding its module here.
"""

from __future__ import annotations

import importlib
from dataclasses import fields
from typing import Any

STAGES: dict[str, str] = {
    "pretrain": "tessera.train.pretrain",
    "sft": "tessera.train.sft",
    "vico": "tessera.train.vico",
    "router": "tessera.train.router_stage",
    "mpo": "tessera.train.mpo",
    "gspo": "tessera.train.gspo",
}


def build_stage(name: str, model, data: dict[str, Any] | None = None):
    """The named stage for `model`, with the stage's data options (a dict, e.g. from a config file)."""
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; choose from {', '.join(STAGES)}")
    return importlib.import_module(STAGES[name]).build_stage(model, data)


def dataclass_from(cls: type, data: Any):
    """`cls(**data)` for a dict (unknown keys named in the error), the instance itself, or defaults for None."""
    if data is None:
        return cls()
    if isinstance(data, cls):
        return data
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} option(s): {', '.join(unknown)}; known: {', '.join(sorted(names))}")
    return cls(**data)
