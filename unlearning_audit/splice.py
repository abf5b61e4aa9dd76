"""The causal layer test (splice): does restoring the top blocks undo an unlearning edit?

Token-level scores say a model forgot; they do not say where the edit sits. Splicing asks the
model itself. For k = 1..L (L decoder blocks, numbered as in :mod:`layers`), two spliced models:

* ``original+unlearned_top`` (a): the original with the unlearned model's last k blocks and
  head;
* ``unlearned+original_top`` (b): the unlearned model with the original's last k blocks and head
  restored.

Both are scored on the forget and retain sets by the evaluate stage's scorer
(:func:`evaluation.evaluate`). If (b) at small k answers the forget set about as well as the
original, the edit was shallow: it sits in the top blocks and the head, and everything below still
holds the facts. k = 0 is each model unspliced, the reference the spliced scores are read against.

The head is everything after the last block: the final norm and the LM head (layer L + 1), less
any position embeddings that :func:`layers.parameter_layers` files there too (GPT-2's ``wpe``,
OPT's ``embed_positions``: they act at the input). A tied LM head is the input embedding matrix:
splicing the head then moves the shared matrix, input embeddings included, so with k = L the
spliced model is exactly the donor. With an untied head, k = L leaves the recipient's embeddings
alone, and the spliced model is the donor but for them.

Both directions come from two loaded models and no copy of either: at each k the one block that
joins the top k (and at k = 1 the head) is swapped between the two in place, so the original
becomes (a) and the unlearned model (b) at once; they are swapped back at the end. The two models
must have the same parameters (checked first); a donor's tensor is cast to the recipient's dtype.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch import nn

from . import evaluation, stats
from .layers import decoder_blocks, parameter_layers
from .metrics.weights import check_same_architecture, tied_parameters
from .prompts import Renderer

DIRECTIONS = ("original+unlearned_top", "unlearned+original_top")
"""(a) the original with the unlearned model's top k blocks and head; (b) the reverse."""
SETS = ("forget", "retain")


def n_blocks(model: nn.Module) -> int:
    """L, the model's number of decoder blocks."""
    return len(decoder_blocks(model)[1])


def head_tied(model: nn.Module) -> bool:
    """Whether the LM head's matrix is the input embedding matrix (one tensor)."""
    return bool(tied_parameters(model))


def spliced_part(model: nn.Module, k: int) -> list[str]:
    """The names of the parameters that join the top ``k`` blocks when going from k - 1 to k:
    block L - k (0-based), and at k = 1 the head too (see the module docstring)."""
    layer_of = parameter_layers(model)
    blocks = n_blocks(model)
    if not 1 <= k <= blocks:
        raise ValueError(f"splice depth {k} does not exist: the model has {blocks} blocks")
    at_input = {
        id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()
    }
    output = model.get_output_embeddings() if k == 1 else None  # None: a model without a head
    head = {id(p) for p in output.parameters()} if output is not None else set()
    return [
        name
        for name, p in model.named_parameters()
        if layer_of[name] == blocks + 1 - k
        or (k == 1 and layer_of[name] == blocks + 1 and id(p) not in at_input)
        or id(p) in head
    ]


def top_parameters(model: nn.Module, k: int) -> list[str]:
    """The names of the parameters of the top ``k`` blocks and the head (none for k = 0)."""
    return [name for depth in range(1, k + 1) for name in spliced_part(model, depth)]


@torch.no_grad()
def _swap(a: nn.Module, b: nn.Module, names: Sequence[str]) -> None:
    """Exchange the named parameters' values between ``a`` and ``b``, in place."""
    params_a, params_b = dict(a.named_parameters()), dict(b.named_parameters())
    for name in names:
        pa, pb = params_a[name], params_b[name]
        kept = pa.detach().clone()
        pa.copy_(pb.detach().to(pa.device))
        pb.copy_(kept.to(pb.device))


def splices(original: nn.Module, unlearned: nn.Module, depths: Sequence[int]) -> Iterator[int]:
    """Splice the two models in place, yielding each k of ``depths`` (ascending) while
    ``original`` is direction (a) at k and ``unlearned`` direction (b); both are restored when
    the iteration ends (or is closed). Refuses models with other parameters and depths outside
    1..L."""
    check_same_architecture(original, unlearned)
    wanted = sorted(set(depths))
    blocks = n_blocks(original)
    if wanted and not 1 <= wanted[0] <= wanted[-1] <= blocks:
        raise ValueError(f"splice depths {wanted} must lie in 1..{blocks} (the model's blocks)")
    swapped: list[list[str]] = []
    try:
        for k in range(1, (wanted[-1] if wanted else 0) + 1):
            swapped.append(spliced_part(original, k))
            _swap(original, unlearned, swapped[-1])
            if k in wanted:
                yield k
    finally:
        for names in reversed(swapped):
            _swap(original, unlearned, names)


def splice_facts(
    original: nn.Module,
    unlearned: nn.Module,
    fmt: Renderer,
    sets: dict[str, list[dict]],
    depths: Sequence[int],
    metric: str,
    generate: int = 0,
) -> list[dict]:
    """Per direction and k (k = 0: the models unspliced), every fact's score in ``metric`` on
    each of ``sets`` (lists in row order), by :func:`evaluation.evaluate`; ``generate``: its
    cap on new tokens where the metric needs generations (rouge_l)."""

    def scored(k: int) -> list[dict]:
        return [
            {
                "direction": direction,
                "k": k,
                **{
                    name: evaluation.evaluate(model, fmt, rows, generate=generate)["rows"].get(
                        metric, []
                    )
                    for name, rows in sets.items()
                },
            }
            for direction, model in zip(DIRECTIONS, (original, unlearned), strict=True)
        ]

    out = scored(0)
    for k in splices(original, unlearned, depths):
        out += scored(k)
    return out


def mean_interval(
    values: Sequence[float], groups: Sequence[str], alpha: float, resamples: int
) -> dict[str, float | int | None]:
    """A set's mean score with its (1 - 2 alpha) cluster-bootstrap interval over ``groups``,
    as the verdict computes its intervals (stats.cluster_means, stats.bounds); None for no
    facts."""
    if not len(values):
        return {"score": None, "lower": None, "upper": None, "n": 0}
    arr = np.asarray(values, dtype=float)
    lower, upper = stats.bounds(stats.cluster_means(arr, groups, resamples, seed=0), alpha)
    return {"score": float(arr.mean()), "lower": lower, "upper": upper, "n": len(arr)}


def summarize(
    facts: list[dict], groups: dict[str, list[str]], alpha: float, resamples: int
) -> list[dict]:
    """The rows the splice stage stores: per direction and k, each set's mean score with its
    interval (:func:`mean_interval`); ``groups``: each set's fact groups, in row order."""
    return [
        {
            "direction": row["direction"],
            "k": row["k"],
            **{name: mean_interval(row[name], groups[name], alpha, resamples) for name in groups},
        }
        for row in facts
    ]


def _forget(facts: list[dict], direction: str, k: int) -> list[float]:
    return next(r["forget"] for r in facts if r["direction"] == direction and r["k"] == k)


def restored_share(
    facts: list[dict], groups: Sequence[str], alpha: float, resamples: int, k: int = 1
) -> dict[str, float] | None:
    """How much of the forgetting restoring the original's top ``k`` blocks and head undoes:
    (F_b(k) - F_u) / (F_o - F_u), forget-set means of direction (b) at k, of the unlearned model
    and of the original. 1: the forget answers all come back (a shallow edit); 0: none do.

    With its (1 - 2 alpha) interval from a paired cluster bootstrap over ``groups`` (the three
    means drawn from the same resampled groups). None where ``k`` was not spliced, or where the
    unlearned model is not significantly below the original on the forget set (the gap's
    one-sided lower bound at most 0): a share of a gap that may be nothing is no evidence, and
    its ratio has no stable interval. The few draws whose gap is not positive are dropped."""
    if not any(r["k"] == k for r in facts):
        return None
    columns = [
        _forget(facts, DIRECTIONS[1], k),
        _forget(facts, DIRECTIONS[1], 0),
        _forget(facts, DIRECTIONS[0], 0),
    ]
    matrix = np.asarray(columns, dtype=float).T
    if not len(matrix):
        return None
    restored, unlearned, original = matrix.mean(axis=0)
    draws = stats.cluster_means(matrix, groups, resamples, seed=0)
    gap = draws[:, 2] - draws[:, 1]
    if original - unlearned <= 0 or stats.bounds(gap, alpha)[0] <= 0:
        return None
    shares = (draws[gap > 0, 0] - draws[gap > 0, 1]) / gap[gap > 0]
    lower, upper = stats.bounds(shares, alpha)
    return {
        "share": float((restored - unlearned) / (original - unlearned)),
        "lower": lower,
        "upper": upper,
    }
