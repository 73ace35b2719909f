"""Training: data (packing, square averaging), losses, the one trainer loop, the stages and the recipe.

A stage is a module with `build_stage(model, data: dict | None) -> Stage` (see tessera.train.stage for the
Stage protocol); `STAGES` names them for `tessera train STAGE` and the recipe. Add a stage by adding its module here.
"""

from __future__ import annotations

import importlib
from dataclasses import asdict, fields, is_dataclass
from typing import Any

STAGES: dict[str, str] = {
    "pretrain": "tessera.train.pretrain",
    "sft": "tessera.train.sft",
    "vico": "tessera.train.vico",
    "router": "tessera.train.router_stage",
    "question_router": "tessera.train.question_router_stage",
    "question_router_policy": "tessera.train.question_router_policy",
    "mpo": "tessera.train.mpo",
    "gspo": "tessera.train.gspo",
}


def build_stage(name: str, model, data: dict[str, Any] | None = None):
    """The named stage for `model`, with the stage's data options (a dict, e.g. from a config file)."""
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; choose from {', '.join(STAGES)}")
    return importlib.import_module(STAGES[name]).build_stage(model, data)


def dataclass_from(cls: type, data: Any):
    """`cls(**data)` for a dict (unknown keys named in the error), the instance itself, or defaults
    for None.

    A field that is itself a dataclass (a stage's `sampling`) takes a dict of its own fields, laid
    over the field's default; its fields may also be given flat, beside cls's own (run configs
    written before they were grouped), but not both ways at once."""
    if data is None:
        return cls()
    if isinstance(data, cls):
        return data
    defaults = cls()
    names = {f.name for f in fields(cls)}
    nested = {n: type(getattr(defaults, n)) for n in names if is_dataclass(getattr(defaults, n))}
    data = dict(data)
    for name, sub in nested.items():
        given = data.get(name, {})
        if isinstance(given, sub):
            continue
        if not isinstance(given, dict):
            raise ValueError(
                f"{cls.__name__} option {name!r} must be a mapping of {sub.__name__} fields"
            )
        own = [f.name for f in fields(sub) if f.name in data and f.name not in names]
        flat = {k: data.pop(k) for k in own}
        both = sorted(set(flat) & set(given))
        if both:
            raise ValueError(
                f"{cls.__name__}: {', '.join(both)} given both flat and under {name!r}"
            )
        if flat or name in data:
            data[name] = dataclass_from(sub, {**asdict(getattr(defaults, name)), **given, **flat})
    unknown = sorted(set(data) - names)
    if unknown:
        known = sorted(names | {f.name for sub in nested.values() for f in fields(sub)})
        raise ValueError(
            f"unknown {cls.__name__} option(s): {', '.join(unknown)}; known: {', '.join(known)}"
        )
    return cls(**data)
