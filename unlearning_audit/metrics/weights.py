"""Per-layer weight change between two checkpoints (two models, or a model and a stored
checkpoint's tensors), and the grouping of parameters by layer.

Layers follow :mod:`unlearning_audit.layers` (0 = embeddings, i = decoder block i - 1, L + 1 =
final norm and LM head), with blocks matched by exact index, never by substring. A tied LM head
shares the embedding matrix; ``named_parameters`` lists it once, under the embeddings (layer 0);
:func:`tied_parameters` names it, for the depth shares that count it apart
(:mod:`unlearning_audit.metrics.depth`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from unlearning_audit import checkpoints
from unlearning_audit.layers import parameter_layers

LayerParameters = dict[int, list[tuple[str, nn.Parameter]]]


def layer_parameters(model: nn.Module) -> LayerParameters:
    """The model's parameters grouped by layer index, in ``named_parameters`` order.

    Fisher values and weight differences of a layer are concatenated in this order, so the
    flat vectors of two models (or of a Fisher and a weight difference) line up entry by entry.
    """
    layer_of = parameter_layers(model)
    groups: LayerParameters = {}
    for name, param in model.named_parameters():
        groups.setdefault(layer_of[name], []).append((name, param))
    return dict(sorted(groups.items()))


def select_layers(groups: LayerParameters, layers: Iterable[int] | None) -> list[int]:
    """Layer indices to use: all of ``groups`` for None, else ``layers`` checked to exist."""
    if layers is None:
        return list(groups)
    chosen = sorted(set(layers))
    missing = [layer for layer in chosen if layer not in groups]
    if missing:
        raise ValueError(
            f"layer {missing} does not exist: the model has parameter layers 0 (embeddings) "
            f"to {max(groups)} (final norm and head)"
        )
    return chosen


def check_same_architecture(model_a: nn.Module, model_b: nn.Module) -> None:
    """Refuse two models whose parameter names or shapes differ, naming the first mismatches."""
    shapes_a = {name: tuple(p.shape) for name, p in model_a.named_parameters()}
    shapes_b = {name: tuple(p.shape) for name, p in model_b.named_parameters()}
    if shapes_a == shapes_b:
        return
    only_a = sorted(shapes_a.keys() - shapes_b.keys())
    only_b = sorted(shapes_b.keys() - shapes_a.keys())
    reshaped = sorted(
        f"{name} {shapes_a[name]} vs {shapes_b[name]}"
        for name in shapes_a.keys() & shapes_b.keys()
        if shapes_a[name] != shapes_b[name]
    )
    problems = [
        f"{label}: {', '.join(items[:5])}{' ...' if len(items) > 5 else ''}"
        for label, items in (
            ("only in the first model", only_a),
            ("only in the second model", only_b),
            ("different shapes", reshaped),
        )
        if items
    ]
    raise ValueError("the models have different parameters; " + "; ".join(problems))


def paired_parameters(
    model_a: nn.Module, model_b: nn.Module
) -> Iterator[tuple[int, str, torch.Tensor, torch.Tensor]]:
    """(layer, name, theta_a, theta_b) for each parameter, detached, in
    :func:`layer_parameters` order of model_a, after checking that the two models have the same
    parameters."""
    check_same_architecture(model_a, model_b)
    params_b = dict(model_b.named_parameters())
    for layer, params in layer_parameters(model_a).items():
        for name, param in params:
            yield layer, name, param.detach(), params_b[name].detach().to(param.device)


def tied_parameters(model: nn.Module) -> set[str]:
    """Names of the parameters the input embeddings share with the output embeddings (the LM
    head): a tied head's matrix, listed once by ``named_parameters``, under the embeddings
    (layer 0). Empty for an untied head (or a model without one)."""
    head = model.get_output_embeddings()
    if head is None:
        return set()
    head_ids = {id(p) for p in head.parameters()}
    embedding_ids = {id(p) for p in model.get_input_embeddings().parameters()}
    return {
        name
        for name, param in model.named_parameters()
        if id(param) in head_ids and id(param) in embedding_ids
    }


@torch.no_grad()
def weight_change(model_a: nn.Module, model_b: nn.Module) -> dict[int, float]:
    """Relative weight change per layer, ||theta_b - theta_a||_F / ||theta_a||_F
    (:func:`weight_change_from` with model_a's parameters), after checking that the two models
    have the same parameters. A change concentrated in the last layers marks a shallow edit near
    the output."""
    check_same_architecture(model_a, model_b)
    return weight_change_from(dict(model_a.named_parameters()), model_b)


@torch.no_grad()
def weight_change_from(original: Mapping[str, torch.Tensor], model: nn.Module) -> dict[int, float]:
    """Relative weight change per layer of ``model`` from ``original`` (each of its parameters'
    earlier values, by name: another model's parameters, or a checkpoint's tensors read one at a
    time), ||theta - theta0||_F / ||theta0||_F: :func:`relative_change` of its
    :func:`squared_changes`."""
    return relative_change(list(squared_changes(original, model)), model)


def relative_change(
    changes: Sequence[tuple[str, float, float]], model: nn.Module
) -> dict[int, float]:
    """||theta - theta0||_F / ||theta0||_F per layer from :func:`squared_changes` of ``model``'s
    parameters, the norms running over all of the layer's parameters together."""
    square0 = sum_by_layer(((name, value) for name, value, _ in changes), model)
    square_diff = sum_by_layer(((name, value) for name, _, value in changes), model)
    change = {}
    for layer, total in square0.items():
        if total == 0:
            raise ValueError(f"layer {layer} of the original model is all zeros")
        change[layer] = (square_diff[layer] / total) ** 0.5
    return change


def sum_by_layer(values: Iterable[tuple[str, float]], model: nn.Module) -> dict[int, float]:
    """Per-parameter ``values`` (name, value) of ``model`` summed per layer, in the order the
    layers first appear."""
    layer_of = parameter_layers(model)
    sums: dict[int, float] = {}
    for name, value in values:
        sums[layer_of[name]] = sums.get(layer_of[name], 0.0) + value
    return sums


@torch.no_grad()
def squared_changes(
    original: Mapping[str, torch.Tensor], model: nn.Module
) -> Iterator[tuple[str, float, float]]:
    """(name, ||theta0||^2, ||theta - theta0||^2) of each of ``model``'s parameters against its
    earlier value in ``original`` (by name), in :func:`layer_parameters` order; sums of squares
    add up over parameters, so any grouping of them (layers, depth shares) sums these. In
    float64, on ``model``'s device (one of ``original``'s tensors there at a time)."""
    for params in layer_parameters(model).values():
        for name, param in params:
            theta = param.detach()
            theta0 = original[name].detach().to(theta.device).double()
            yield (
                name,
                float(theta0.square().sum()),
                float((theta.double() - theta0).square().sum()),
            )


def weight_change_from_checkpoint(
    folder: Path, model: nn.Module, trust_remote_code: bool = False
) -> dict[int, float]:
    """:func:`weight_change` of ``model`` against the original checkpoint in ``folder``, its
    tensors read one at a time from its safetensors files (checkpoints.stored_tensors) rather
    than built into a second model: at 7B, no second copy of the weights in memory.

    Where the files do not hold every parameter of ``model`` under its name and shape
    (transformers renames or fuses some architectures' tensors on load: GPT-NeoX's
    ``embed_out`` is its ``lm_head``), the checkpoint is loaded on the CPU instead and compared
    by :func:`weight_change`, which also refuses another architecture. The checkpoint's own
    model code runs only with ``trust_remote_code``.
    """
    with checkpoints.stored_tensors(folder) as stored:
        if all(
            name in stored and stored.shape(name) == tuple(param.shape)
            for name, param in model.named_parameters()
        ):
            return weight_change_from(stored, model)
    original, _ = checkpoints.load(folder, "cpu", trust_remote_code=trust_remote_code)
    return weight_change(original, model)
