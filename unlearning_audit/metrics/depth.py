"""Where an edit sits: the share of a change that lies in the last k decoder blocks plus the
head, for k = 0 (the head alone) to L (every block).

The change is measured two ways, both sums over parameters so that shares add up:

* the squared weight change, sum_j (theta_j - theta0_j)^2 (the square of the Frobenius norm
  that :func:`~unlearning_audit.metrics.weights.weight_change` divides by the original's; a
  share of squares, since relative norms do not add across layers);
* the Fisher-weighted distance, sum_j F0_j (theta_j - theta0_j)^2 with the original's diagonal
  Fisher (:func:`~unlearning_audit.metrics.fisher.fisher_weighted_terms`).

Parts follow :mod:`unlearning_audit.layers`: the input embeddings, the L blocks, and the head
(layer L + 1: the final norm and an untied LM head). A tied LM head shares its matrix with the
input embeddings, and a change to that matrix cannot be told apart as the head's or the
embeddings'; it is its own part, ``tied``, counted two ways:

* ``parts.share()``: the tied matrix counted as head (the largest share the head can be given);
* ``parts.share(tied_as_head=False)``: the tied matrix left out of both the part and the whole
  (the share among the parameters whose place is unambiguous).

The tied matrix's own share of the whole, :attr:`DepthParts.tied_share`, is reported beside
them: the first curve minus it is the share with the tied matrix counted as embeddings. For an
untied model the two curves agree and the tied share is 0.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from unlearning_audit.layers import decoder_blocks, parameter_layers
from unlearning_audit.metrics.weights import tied_parameters


@dataclass(frozen=True)
class DepthParts:
    """A change split by where it sits: ``embeddings`` (layer 0 less the tied matrix),
    ``blocks`` (block 0 first), ``head`` (layer L + 1) and ``tied`` (a tied head/embedding
    matrix; 0 when untied)."""

    embeddings: float
    blocks: tuple[float, ...]
    head: float
    tied: float

    @property
    def total(self) -> float:
        """The whole change, every part together."""
        return self.embeddings + sum(self.blocks) + self.head + self.tied

    @property
    def tied_share(self) -> float:
        """The tied matrix's share of the whole (NaN where nothing changed)."""
        return self.tied / self.total if self.total else float("nan")

    def share(self, tied_as_head: bool = True) -> list[float]:
        """Share of the change in the last k blocks plus the head, for k = 0..L (see the
        module doc for the tied matrix); NaN for every k where nothing changed."""
        tied = self.tied if tied_as_head else 0.0
        whole = self.total - (0.0 if tied_as_head else self.tied)
        if whole == 0:
            return [float("nan")] * (len(self.blocks) + 1)
        last = [sum(self.blocks[len(self.blocks) - k :]) for k in range(len(self.blocks) + 1)]
        return [(self.head + tied + blocks) / whole for blocks in last]


def depth_parts(values: Iterable[tuple[str, float]], model: nn.Module) -> DepthParts:
    """Sum per-parameter ``values`` (name, value; parameter names of ``model``, each once) into
    :class:`DepthParts` of ``model``: blocks and head by :func:`parameter_layers`, the tied
    matrix (:func:`tied_parameters`) apart from the embeddings."""
    layer_of = parameter_layers(model)
    tied = tied_parameters(model)
    n_blocks = len(decoder_blocks(model)[1])
    blocks = [0.0] * n_blocks
    embeddings = head = tied_sum = 0.0
    for name, value in values:
        layer = layer_of[name]
        if name in tied:
            tied_sum += value
        elif layer == 0:
            embeddings += value
        elif layer == n_blocks + 1:
            head += value
        else:
            blocks[layer - 1] += value
    return DepthParts(embeddings, tuple(blocks), head, tied_sum)


def weight_depth(changes: Iterable[tuple[str, float, float]], model: nn.Module) -> DepthParts:
    """The squared weight change by part, from ``model``'s
    :func:`~unlearning_audit.metrics.weights.squared_changes` (the pass the per-layer weight
    change sums too)."""
    return depth_parts(((name, diff) for name, _, diff in changes), model)


def fisher_depth(
    terms: Iterable[tuple[str, float]], fisher0: Mapping[int, torch.Tensor], model: nn.Module
) -> DepthParts | None:
    """The original-Fisher-weighted distance by part, from its per-parameter ``terms``
    (:func:`~unlearning_audit.metrics.fisher.fisher_weighted_terms` of ``fisher0``, the pass the
    per-layer distance sums too); None where ``fisher0`` lacks a layer of ``model`` (a Fisher of
    chosen layers only has no whole to share)."""
    if set(fisher0) != set(parameter_layers(model).values()):
        return None
    return depth_parts(terms, model)
