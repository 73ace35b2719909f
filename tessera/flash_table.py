"""The Flash table: one model evaluated under the four routings on the same held-out questions.

`flash_summary` is what the recipe's report shows and `tessera bench router` extends (vision timing, router
tile accuracy, the world's bound); both build on `evaluate_modes` and `summarise`. The targets are the paper's
claims in miniature (Table 17: the router saves visual tokens and keeps accuracy; all-compressed loses reading).
"""

from __future__ import annotations

from tessera.evaluate import evaluate
from tessera.routing import RELEASED_MODES
from tessera.world import READING_FAMILIES

TARGETS = {
    "compressed_reading_drop": 10.0,
    "tokens_saved": 40.0,
    "accuracy_kept": 98.0,
    "router_minus_random": 5.0,
}


def evaluate_modes(
    model, n: int, seed: int = 0, batch_size: int = 16, modes: tuple[str, ...] | None = None
) -> dict:
    """routing → EvalResult on the same n held-out questions; `random` compresses as many tiles as the router."""
    if modes is None:
        has_question = getattr(model, "question_router", None) is not None
        modes = RELEASED_MODES + (("question",) if has_question else ())
    return {
        m: evaluate(model, seed=seed, n=n, routing=m, batch_size=batch_size, keep_records=False)
        for m in modes
    }


def reading_accuracy(r) -> float:
    """Mean accuracy over the reading families (label, document) of an EvalResult."""
    vals = [r.families[f] for f in READING_FAMILIES if f in r.families]
    return sum(vals) / len(vals) if vals else float("nan")


def summarise(results: dict, vision: dict | None, router_acc: dict | None) -> dict:
    reading = reading_accuracy

    full, comp, rout, rand = (results[m] for m in RELEASED_MODES)
    s = {
        "families": list(full.families),
        "modes": {
            m: {
                "families": r.families,
                "overall": r.overall,
                "reading": reading(r),
                "visual_tokens": r.visual_tokens_per_image,
                "compressed_tiles": r.compressed_tile_fraction,
                "samples_per_second": r.samples_per_second,
                "tokens_saved": 100
                * (1 - r.visual_tokens_per_image / full.visual_tokens_per_image),
                "accuracy_kept": 100 * r.overall / full.overall if full.overall else float("nan"),
            }
            for m, r in results.items()
        },
        "tokens_saved": 100 * (1 - rout.visual_tokens_per_image / full.visual_tokens_per_image),
        "accuracy_kept": 100 * rout.overall / full.overall if full.overall else float("nan"),
        "reading_kept": 100 * reading(rout) / reading(full) if reading(full) else float("nan"),
        "compressed_reading_drop": 100 * (reading(full) - reading(comp)),
        "router_minus_random": 100 * (reading(rout) - reading(rand)),
        "throughput_ratio": rout.samples_per_second / full.samples_per_second,
        "n": full.n,
        "seed": full.seed,
    }
    if vision:
        s["vision"] = vision
    if router_acc:
        s["router_tiles"] = router_acc
    t = TARGETS
    s["targets"] = {
        f"all-compressed loses >= {t['compressed_reading_drop']:.0f} points on reading": s[
            "compressed_reading_drop"
        ]
        >= t["compressed_reading_drop"],
        f"router saves >= {t['tokens_saved']:.0f} % of visual tokens": s["tokens_saved"]
        >= t["tokens_saved"],
        f"router keeps >= {t['accuracy_kept']:.0f} % of full's accuracy": s["accuracy_kept"]
        >= t["accuracy_kept"],
        f"router >= random + {t['router_minus_random']:.0f} points on reading (same budget)": s[
            "router_minus_random"
        ]
        >= t["router_minus_random"],
        "end-to-end eval throughput with router > full": s["throughput_ratio"] > 1.0,
    }
    if vision:
        s["targets"]["vision side (ViT + router + chosen branch) costs <= full's (time)"] = (
            vision["time_ratio"] <= 1.0
        )
    return s


def flash_summary(model, n: int, seed: int = 0, batch_size: int = 16) -> dict:
    """`summarise` of the four routings of a Flash `model` at its configured thresholds (no vision timing, no
    router tile accuracy): what the recipe's report shows."""
    if model.router is None:
        raise ValueError(
            "the Flash table needs a Flash model (mlp2 and a router); this one has neither"
        )
    s = summarise(evaluate_modes(model, n, seed, batch_size), None, None)
    flash = model.config.flash
    s.update(
        relative_threshold=flash.relative_threshold, absolute_threshold=flash.absolute_threshold
    )
    return s
