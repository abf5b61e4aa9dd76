"""The relearning attack: fine-tune with a small budget and record how fast knowledge returns.

The budget counts examples, as a multiple of the forget set's size (1.0 = as many examples as
the forget set has). The recovery curve is exact match at steps 0, 1, 2, 4, 8, ... and the last.
Sources (DESIGN.md, "Relearning"): the forget set; one half of it, evaluated on the other half,
where any recovery must come from knowledge still in the weights; retain or unrelated data.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from . import data, training
from .config import RelearnConfig, RelearnSource
from .evaluation import exact_match

TRAIN_SET: dict[str, str] = {
    "forget": "forget",
    "forget-half": "forget_a",
    "retain": "retain",
    "unrelated": "unrelated",
}


def budget_steps(n_forget: int, budget: float, batch_size: int) -> int:
    """Optimiser steps that show ``budget * n_forget`` examples (rounded up to a whole batch)."""
    return max(1, math.ceil(budget * n_forget / batch_size))


def curve_steps(total: int) -> list[int]:
    """0, 1, 2, 4, 8, ... below ``total``, then ``total``."""
    steps, s = [0], 1
    while s < total:
        steps.append(s)
        s *= 2
    return [*steps, total]


def relearn(
    model,
    tokenizer,
    sets: dict[str, list[dict]],
    source: RelearnSource,
    config: RelearnConfig,
    seed: int,
    progress: Callable[[int, int], None] | None = None,
    max_rows: int | None = None,
) -> dict:
    """Relearn ``model`` in place from ``source``; returns the recovery curve and the budget.

    The curve holds exact match on the forget set and on both halves at each curve step, on at
    most ``max_rows`` rows of each (the same seeded sample the evaluate stage scores).
    ``progress(step, steps)`` follows the training loop.
    """
    train_rows = sets[TRAIN_SET[source]]
    if not train_rows:
        raise ValueError(f"relearning source {source!r} has no rows")
    steps = budget_steps(len(sets["forget"]), config.budget, config.batch_size)
    probes = {
        name: data.sample(sets[name], max_rows) if max_rows else sets[name]
        for name in ("forget", "forget_a", "forget_b")
    }
    marks = set(curve_steps(steps))
    curve = []

    def record(step: int) -> bool:
        if step in marks:
            point = {name: exact_match(model, tokenizer, rows) for name, rows in probes.items()}
            curve.append({"step": step, "examples": step * config.batch_size, **point})
            model.train()
        return False

    record(0)
    device = next(model.parameters()).device
    batches = (
        training.to_device(data.train_batch(tokenizer, rows), device)
        for rows in data.shuffled_batches(train_rows, config.batch_size, seed)
    )
    training.fit(
        model,
        training.mean_nll,
        batches,
        steps,
        config.lr,
        record,
        progress=progress,
        micro_batches=config.micro_batches,
    )
    return {"source": source, "steps": steps, "examples": steps * config.batch_size, "curve": curve}
