"""`headstart plan`: what `auto` would measure, try and train, with the predicted time of each,
before anything trains."""

from __future__ import annotations

import dataclasses

from headstart.data.layout import resolve_data
from headstart.training.auto.budget import Budget, parse_duration
from headstart.training.auto.candidates import grid
from headstart.training.auto.costs import predict, shared_cost
from headstart.training.auto.profile import DataProfile, Speed
from headstart.training.auto.scoring import selection_metric
from headstart.training.auto.search import (
    PILOT_EPOCHS,
    SAFETY,
    affordable,
    final_config,
    measure_for,
    plan_pilots,
    search_share,
)
from headstart.training.auto.splits import fold_count, folds


def preview(cfg, *, speed: Speed | None = None) -> dict:
    """`headstart plan`: the measurements, the candidates and the predicted time of every stage,
    before anything trains (the pilots' scores decide the rest)."""
    budget = Budget(parse_duration(cfg.budget))
    split = resolve_data(cfg.data, val=cfg.val, val_fraction=cfg.val_fraction, seed=cfg.seed)
    profile = DataProfile.of(split)
    speed = speed or measure_for(cfg, split, budget)
    speed.shared_pass = True  # as auto's search prices its stages
    everything = grid(profile, speed, cfg.backbone)
    candidates = affordable(everything, speed, profile, budget.left() * SAFETY)
    k = fold_count(split)
    first = folds(split, cfg.seed, k)[0]
    search_seconds = search_share(speed, split, budget.seconds, candidates) * budget.left()
    piloted, subs, cost = plan_pilots(candidates, first, speed, profile.classes, search_seconds, cfg.seed)
    # frozen passes run once for the pilots that share them (shared_pass.py); each pilot reads the cache
    will = {k: set(v) for k, v in speed.extracted.items()}
    shared = shared_cost(piloted, subs[0], speed, will) if subs else 0.0
    rows = []
    for c in everything:
        final = final_config(cfg, c, speed, split, budget)
        pilot_s = round(predict(c, speed, subs[0], PILOT_EPOCHS, will), 1) if subs and c in piloted else None
        rows.append(
            {
                "name": c.name,
                "affordable": c in candidates,
                "piloted": c in piloted,  # a short budget pilots fewer of each family
                "options": c.options,
                "pilot_seconds": pilot_s,
                "final_epochs": final.config.resolved().epochs,
                "final_images": final.train_images,
                "final_seconds": round(final.seconds, 1),
            }
        )
    return {
        "budget_seconds": budget.seconds,
        "profile": dataclasses.asdict(profile),
        "speed": speed.to_dict(),
        "folds": k,
        "selected_by": selection_metric(cfg),
        "pilot_images": len(subs[0].train) if subs else None,
        "pilot_val_images": len(subs[0].val) if subs else None,
        "pilot_seconds": round(cost, 1) if cost else None,
        "shared_pass_seconds": round(shared, 1),
        "candidates": rows,
    }
