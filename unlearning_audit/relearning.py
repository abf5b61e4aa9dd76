"""The relearning attack: fine-tune with a small budget and record how fast knowledge returns.

The budget counts examples, as a multiple of the forget set's size (1.0 = as many examples as
the forget set has). The recovery curve holds every fact's scores at steps 0, 1, 2, 4, 8, ...
and the last (the verdict pairs them fact by fact). A run is one seed of data order; the audit
runs several and the verdict averages per fact over them.
Sources (DESIGN.md, "Relearning"): the forget set; one half of it, evaluated on the other half,
where any recovery must come from knowledge still in the weights; retain or unrelated data.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from . import adapters, data, training
from .config import RelearnConfig, RelearnSource
from .evaluation import GENERATED, SCORES, score_rows
from .prompts import Renderer

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
    fmt: Renderer,
    sets: dict[str, list[dict]],
    source: RelearnSource,
    config: RelearnConfig,
    seed: int,
    progress: Callable[[int, int], None] | None = None,
    max_rows: int | None = None,
    generate: int = 0,
    precision: str = "fp32",
    checkpointing: bool = False,
) -> dict:
    """Relearn ``model`` in place from ``source``; returns the recovery curve and the budget,
    with the trained LoRA adapter under ``adapter`` where ``config.lora_rank`` asks for one
    (merged into ``model`` afterwards; None for full training).

    The curve holds, at each curve step, under ``facts`` every fact's scores on the forget set
    and on both halves, on at most ``max_rows`` rows of each (the same
    seeded sample the evaluate stage scores).
    With ``generate`` (a cap on new tokens), facts also carry ROUGE-L of greedy generations.
    ``progress(step, steps)`` follows the training loop; an unset learning rate is the model's
    default (training.default_lr). The model trains in ``precision`` (training.fit): the curve's
    step 0 scores it in its own dtype, later steps in the training dtype.
    ``checkpointing``: gradient checkpointing (training.fit).
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
    names = (*SCORES, GENERATED) if generate else SCORES
    lr = config.lr or training.default_lr(model)
    curve = []
    trainable = adapters.wrap(model, config.lora_rank)

    def record(step: int) -> bool:
        if step in marks:
            # the halves are parts of the forget set: the union is scored once
            scores = score_rows(trainable, fmt, union, generate=generate)
            at = {r["id"]: i for i, r in enumerate(union)}
            facts = {
                name: {
                    "id": [r["id"] for r in rows],
                    **{k: [scores[k][at[r["id"]]] for r in rows] for k in names},
                }
                for name, rows in probes.items()
            }
            curve.append({"step": step, "examples": step * config.batch_size, "facts": facts})
            trainable.train()
        return False

    record(0)
    device = next(model.parameters()).device
    batches = (
        training.to_device(data.train_batch(fmt, rows), device)
        for rows in data.shuffled_batches(train_rows, config.batch_size, seed)
    )
    training.fit(
        trainable,
        training.mean_nll,
        batches,
        steps,
        lr,
        record,
        progress=progress,
        micro_batches=config.micro_batches,
        precision=precision,
        checkpointing=checkpointing,
    )
    examples = steps * config.batch_size
    return {
        "adapter": adapters.detach(trainable) if trainable is not model else None,
        "source": source,
        "steps": steps,
        "examples": examples,
        "lr": lr,
        "precision": precision,
        "curve": curve,
    }


def mean_curve(curves: list[list[dict]], metric: str) -> list[dict]:
    """The recovery curve in ``metric`` averaged over seeds (one curve per seed, same steps):
    each point's set-level mean over facts is the seeds' mean, with their range under
    ``spread``."""
    names = ("forget", "forget_a", "forget_b")

    def level(point: dict, name: str) -> float:
        values = point["facts"][name][metric]
        return sum(values) / len(values) if values else math.nan

    out = []
    for points in zip(*curves, strict=True):
        levels = {n: [level(p, n) for p in points] for n in names}
        out.append(
            {
                "step": points[0]["step"],
                "examples": points[0]["examples"],
                **{n: sum(v) / len(v) for n, v in levels.items()},
                "spread": {n: [min(v), max(v)] for n, v in levels.items()},
                "seeds": len(points),
            }
        )
    return out
