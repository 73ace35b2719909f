"""The world: a procedural, seeded multimodal task generator with exact answers (Tessera's embedded data).

    from tessera.world import make_sample, verify, FAMILIES
    s = make_sample(7)                       # train split, family drawn from the seed, full difficulty
    s.image, s.question, s.answer            # PIL image, "What is the label of the red circle?", "47"
    verify(s.family, "The answer is 47.", s.answer)  # True

scenes.py renders, tasks.py asks, verify.py judges, bench.py fixes the evaluation sets, curriculum.py maps
the difficulty knob to scene settings, probe.py measures how much text a tile and a token carry.
"""

from tessera.world.curriculum import Level, level
from tessera.world.eval_sets import (
    ORACLES,
    EvalItem,
    bound_oracle,
    eval_items,
    eval_set,
    evidence_oracle,
    score,
    text_free_token_savings,
    tuning_items,
)
from tessera.world.scenes import Scene, render
from tessera.world.tasks import (
    ALL_FAMILIES,
    DESCRIBE,
    FAMILIES,
    READING_FAMILIES,
    SPLIT_OFFSETS,
    Lookup,
    Sample,
    build,
    corpus,
    describe,
    make_sample,
    pick_family,
)
from tessera.world.verify import final_text, normalise, verify

__all__ = [
    "ALL_FAMILIES",
    "ORACLES",
    "bound_oracle",
    "evidence_oracle",
    "tuning_items",
    "DESCRIBE",
    "FAMILIES",
    "READING_FAMILIES",
    "SPLIT_OFFSETS",
    "EvalItem",
    "Level",
    "Lookup",
    "Sample",
    "Scene",
    "build",
    "corpus",
    "describe",
    "eval_items",
    "eval_set",
    "final_text",
    "level",
    "make_sample",
    "normalise",
    "pick_family",
    "render",
    "score",
    "text_free_token_savings",
    "verify",
]
