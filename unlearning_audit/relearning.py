"""The relearning attack: fine-tune with a small budget and record how fast knowledge returns.

The budget counts examples, as a multiple of the forget set's size (1.0 = as many examples as
the forget set has). The recovery curve is exact match at steps 0, 1, 2, 4, 8, ... and the last,
with every fact's scores at each of those steps (the verdict pairs them fact by fact). A run is
one seed of data order; the audit runs several and the verdict averages per fact over them.
Sources (DESIGN.md, "Relearning"): the forget set; one half of it, evaluated on the other half,
where any recovery must come from knowledge still in the weights; retain or unrelated data.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from . import data, training
from .config import RelearnConfig, RelearnSource
from .evaluation import SCORES, score_rows

TRAIN_SET: dict[str, str] = {
    "forget": "forget",
    "forget-half": "forget_a",
    "retain": "retain",
    "unrelated": "unrelated",
}


def seeds(seed: int, count: int) -> list[int]:
    """The relearning seeds of an audit with ``seed``: ``count`` data orders, apart from every
    other audit seed's."""
    return [1000 * seed + k for k in range(count)]


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

    The curve holds, at each curve step, exact match on the forget set and on both halves, and
    under ``facts`` every fact's scores there, on at most ``max_rows`` rows of each (the same
    seeded sample the evaluate stage scores).
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
    union = list({r["id"]: r for rows in probes.values() for r in rows}.values())
    curve = []

    def record(step: int) -> bool:
        if step in marks:
            scores = score_rows(model, tokenizer, union)  # the halves are parts of the forget set
            at = {r["id"]: i for i, r in enumerate(union)}
            facts = {
                name: {
                    "id": [r["id"] for r in rows],
                    **{k: [scores[k][at[r["id"]]] for r in rows] for k in SCORES},
                }
                for name, rows in probes.items()
            }
            curve.append(
                {
                    "step": step,
                    "examples": step * config.batch_size,
                    **{
                        name: sum(f["exact_match"]) / max(len(f["id"]), 1)
                        for name, f in facts.items()
                    },
                    "facts": facts,
                }
            )
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


def mean_curve(curves: list[list[dict]]) -> list[dict]:
    """The recovery curve averaged over seeds (one curve per seed, same steps): each point's
    set-level exact match is the seeds' mean, with their range under ``spread``."""
    names = ("forget", "forget_a", "forget_b")
    return [
        {
            "step": points[0]["step"],
            "examples": points[0]["examples"],
            **{n: sum(p[n] for p in points) / len(points) for n in names},
            "spread": {n: [min(p[n] for p in points), max(p[n] for p in points)] for n in names},
            "seeds": len(points),
        }
        for points in zip(*curves, strict=True)
    ]
