"""Diagonal Fisher information of a causal LM, per layer, from per-sample gradients: the
empirical Fisher (the data's labels) or the model's (labels drawn from the model).

F_j = mean over samples i of (d log p(y_i | x_i) / d theta_j)^2, where log p(y_i | x_i) is the sum
of the log-probabilities of sample i's answer tokens (labels != -100; prompt and padding carry
-100). The square must be taken per sample: squaring a batch gradient measures something else.
With the data's answers as y_i this is the empirical Fisher; where the model gives them
probability near 0 (after unlearning) it mostly restates the loss (Kunstner et al. 2019,
"Limitations of the empirical Fisher approximation"). The model's Fisher takes y_i drawn from the
model's own predictive distribution at each answer position instead (Monte Carlo, a seeded
number of draws per row): E_{y ~ p}[(d log p(y | x) / d theta_j)^2], the curvature of the model's
likelihood whatever the data say. Both run through the same per-sample gradients below.

Per-sample gradients come from ``torch.func``: ``vmap(grad(log p))`` over the samples of a batch,
each run through the model as a batch of one with ``functional_call``, so one vectorised backward
pass covers every layer. No architecture's mask handling is involved: each sample's real tokens
are moved to the start of its row (padding after them), and the model sees no attention mask
and default positions. In a causal LM a token never attends to later ones, so trailing pads
change no real token's logits; the sample scores exactly as it would alone, unpadded, with its
positions from 0 (Hugging Face's own masks, and the positions some architectures derive from
them, such as OPT's learned ones, run data-dependent checks that vmap refuses). The model reads
``inputs_embeds`` from its own input embeddings (called functionally, so layer 0 gets its
gradient), since some models inspect ``input_ids`` for pad tokens with data-dependent checks.

PyTorch has no vmap batching rule for the fused ``scaled_dot_product_attention`` kernels and
falls back to a loop over samples inside each attention call, so the model runs with ``eager``
attention while the Fisher is computed, and gets its own implementation back afterwards.
Measured on an H200, 110M-parameter Llama, batch 16: vmap was 1.8x faster than a loop of
single-sample backward passes under ``sdpa``, 3.9x under ``eager``. Eager attention takes its
softmax in float32, so float64 models (tests, exact references) keep their own attention and its
precision. A model that still cannot run under these transforms (remote code with data-dependent
control flow, a forward without ``inputs_embeds``) raises :class:`UnsupportedModel`, found on a
two-token sample before any real batch.

Memory: the per-sample gradients of a pass take samples x parameters (of the chosen layers)
values. With a :class:`SamplesPerPass`, each batch runs in passes of at most that many samples,
and an out-of-memory error in a pass halves the size and runs the pass again, keeping what earlier
passes summed (a pass adds to the sums only once all of its squares are computed), so the
values do not depend on the size but for float rounding. One sample that still does not fit
raises :class:`SampleDoesNotFit`, with the memory one sample needs (:func:`bytes_per_sample`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from unlearning_audit.metrics.weights import (
    layer_parameters,
    paired_parameters,
    select_layers,
    sum_by_layer,
)

IGNORE_INDEX = -100
FISHER_LOG10_EDGES = np.arange(-20.0, 5.0)
"""Fixed histogram bin edges, log10 of Fisher values (one decade per bin), so that summaries of
two models compare bin by bin; values outside are counted in the first or last bin."""
FISHER_QUANTILES = (0.5, 0.9, 0.99)
BATCH_KEYS = ("input_ids", "attention_mask", "labels")

Tensors = dict[str, torch.Tensor]
Labels = Literal["empirical", "model"]
LABELS: tuple[Labels, ...] = ("empirical", "model")
"""The Fisher's labels: the data's (empirical Fisher) or drawn from the model (the model's)."""


class UnsupportedModel(ValueError):
    """The model gives no per-sample gradients under ``torch.func`` (see the module doc)."""


class SampleDoesNotFit(RuntimeError):
    """One sample's per-sample gradients ran out of memory: no pass size can help."""

    def __init__(self, parameters: int):
        self.parameters = parameters
        self.bytes = bytes_per_sample(parameters)
        size = (
            f"{self.bytes / 2**30:.2f} GiB"
            if self.bytes >= 2**30
            else f"{self.bytes / 2**20:.2f} MiB"
        )
        super().__init__(
            f"one sample's per-sample gradients do not fit in memory: the chosen layers hold "
            f"{parameters:,} parameters, about {size} per sample (parameters x 4 bytes x 2), "
            "beside the model and the float32 sums"
        )


@dataclass
class SamplesPerPass:
    """At most ``size`` samples per vmapped pass; :func:`fisher_diagonal` halves ``size`` on
    out-of-memory and leaves it there, so the caller learns the size that fitted (and how many
    times it was halved)."""

    size: int
    halvings: int = 0


def bytes_per_sample(parameters: int) -> int:
    """Rough memory of one sample's pass over ``parameters`` parameters: its gradient and the
    float32 square of it (4 bytes each, the gradient's at most, so 2 x 4 bytes a parameter);
    the backward pass's activations come on top but grow with tokens, not parameters."""
    return 2 * 4 * parameters


def fisher_diagonal(
    model: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    layers: Iterable[int] | None = None,
    passes: SamplesPerPass | None = None,
    labels: Labels = "empirical",
    samples: int = 1,
    seed: int = 0,
) -> dict[int, torch.Tensor]:
    """Diagonal Fisher per layer, empirical or the model's: {layer: flat float32 CPU tensor}.

    ``batches`` yields dicts with ``input_ids``, ``attention_mask`` and ``labels``, LongTensors of
    shape (b, t), labels -100 on prompt and padding, each row's real tokens contiguous (padding
    on the left or the right); every sample counts in the mean, also one without answer tokens
    (its gradient is zero). Each layer's values are its parameters' Fisher values flattened and
    concatenated in :func:`layer_parameters` order; ``layers`` restricts (and speeds up) the
    computation to those layer indices. Without ``passes`` each batch runs in one pass and an
    out-of-memory error is raised; with it, passes take at most ``passes.size`` samples, halved
    on out-of-memory (see the module doc). The model runs in eval mode (no dropout) with eager
    attention, and gets its mode and attention back afterwards. Raises
    :class:`UnsupportedModel` for a model that cannot run under ``torch.func``, and
    :class:`SampleDoesNotFit` when one sample runs out of memory.

    ``labels`` says which labels the squared gradients take at the answer positions:
    ``"empirical"``, the batch's own (the empirical Fisher); ``"model"``, ``samples`` draws per
    row from the model's own predictive distribution at each position (the model's, or "true",
    Fisher, by Monte Carlo; see :func:`_sampled_labels`), the mean then running over rows and
    draws. Draws come from a CPU generator seeded with ``seed``, batch after batch, so they do not
    depend on the device or the pass size.
    """
    if labels not in LABELS:
        raise ValueError(f"labels must be one of {LABELS}, got {labels!r}")
    if samples < 1:
        raise ValueError(f"samples must be at least 1, got {samples}")
    generator = torch.Generator().manual_seed(seed)
    groups = layer_parameters(model)
    chosen = select_layers(groups, layers)
    names = [name for layer in chosen for name, _ in groups[layer]]
    frozen = {name: param.detach() for name, param in model.named_parameters()}
    params = {name: frozen.pop(name) for name in names}
    like = next(iter(params.values()))
    sums = {name: torch.zeros_like(p, dtype=_accumulation_dtype(p)) for name, p in params.items()}
    per_sample_grads = vmap(grad(_sample_log_prob(model)), in_dims=(None, None, 0, 0))
    was_training, n_samples = model.training, 0
    model.eval()
    try:
        with _eager_attention(model, like.dtype):
            _check_supported(model, per_sample_grads, params, frozen)
            for batch in batches:
                input_ids, targets = _prepare_batch(batch, like.device)
                if labels == "model":
                    input_ids, targets = _sampled_labels(
                        model, input_ids, targets, samples, generator, passes, params
                    )
                _add_batch(per_sample_grads, params, frozen, input_ids, targets, sums, passes)
                n_samples += input_ids.shape[0]
    finally:
        model.train(was_training)
    if n_samples == 0:
        raise ValueError("batches is empty: the Fisher needs at least one sample")
    return {
        layer: torch.cat([(sums[name] / n_samples).ravel() for name, _ in groups[layer]])
        .float()
        .cpu()
        for layer in chosen
    }


def _add_batch(
    per_sample_grads: Callable[..., Tensors],
    params: Tensors,
    frozen: Tensors,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    sums: Tensors,
    passes: SamplesPerPass | None,
) -> None:
    """Add one batch's squared per-sample gradients to ``sums``: in one pass without
    ``passes``, else in passes of at most ``passes.size`` samples, halved on out-of-memory."""

    def add(rows: slice) -> None:
        squares = _squared_gradients(
            per_sample_grads, params, frozen, input_ids[rows], labels[rows], sums
        )
        for name, square in squares.items():  # in place: nothing here runs out of memory
            sums[name] += square

    _in_passes(len(input_ids), passes, params, add)


def _in_passes(
    n: int, passes: SamplesPerPass | None, params: Tensors, run: Callable[[slice], None]
) -> None:
    """``run(rows)`` over ``n`` rows: all at once without ``passes``, else slices of at most
    ``passes.size`` rows, the size halved on out-of-memory and the failed slice run again
    (``run`` must change nothing before its last step that can run out of memory)."""
    start = 0
    while start < n:
        stop = min(n, start + passes.size) if passes else n
        try:
            run(slice(start, stop))
        except torch.cuda.OutOfMemoryError:
            if passes is None:
                raise
            _halve(passes, params)
            continue  # the failed pass's memory is freed with its exception, here
        start = stop


def _squared_gradients(
    per_sample_grads: Callable[..., Tensors],
    params: Tensors,
    frozen: Tensors,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    sums: Tensors,
) -> Tensors:
    """One pass: each parameter's per-sample gradients squared and summed over the samples, in
    the dtype of its running sum; each gradient freed once squared. Nothing is added to
    ``sums`` here, so a pass that runs out of memory leaves them as they were."""
    grads = per_sample_grads(params, frozen, input_ids, labels)
    return {
        name: grads.pop(name).to(total.dtype).square_().sum(dim=0) for name, total in sums.items()
    }


def _halve(passes: SamplesPerPass, params: Tensors) -> None:
    """After a pass ran out of memory: half as many samples per pass from now on; a
    :class:`SampleDoesNotFit` if it had one sample."""
    if passes.size == 1:
        raise SampleDoesNotFit(_count(params))
    passes.size, passes.halvings = passes.size // 2, passes.halvings + 1


def _count(params: Tensors) -> int:
    """The number of parameters (values) in ``params``."""
    return sum(p.numel() for p in params.values())


def _check_supported(
    model: nn.Module, per_sample_grads: Callable[..., Tensors], params: Tensors, frozen: Tensors
) -> None:
    """Run the per-sample gradient on one two-token sample; a failure there is the model's
    (its code under ``torch.func``), not the data's, and raises :class:`UnsupportedModel`;
    running out of memory there raises :class:`SampleDoesNotFit`."""
    like = next(iter(params.values()))
    tokens = torch.zeros(1, 2, dtype=torch.long, device=like.device)
    try:
        per_sample_grads(params, frozen, tokens, tokens)
    except torch.cuda.OutOfMemoryError as err:
        raise SampleDoesNotFit(_count(params)) from err
    except Exception as err:
        raise UnsupportedModel(
            f"{type(model).__name__} gives no per-sample gradients under torch.func "
            f"(vmap of grad): {type(err).__name__}: {err}"
        ) from err


@contextmanager
def _eager_attention(model: nn.Module, dtype: torch.dtype) -> Iterator[None]:
    """Run a Hugging Face model whose weights are ``dtype`` with eager attention inside the
    block, unless it is float64 (see the module doc)."""
    config = getattr(model, "config", None)
    previous = getattr(config, "_attn_implementation", None)
    switch = previous not in (None, "eager") and hasattr(model, "set_attn_implementation")
    if not switch or dtype == torch.float64:
        yield
        return
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


def _accumulation_dtype(param: torch.Tensor) -> torch.dtype:
    """At least float32 for the running sums of squares (half precision would lose them)."""
    return torch.promote_types(param.dtype, torch.float32)


def _sample_log_prob(model: nn.Module):
    """log p(y | x) of one sample, its real tokens first, as a function of (params, frozen
    params, ids, labels): the ids go through the input embeddings, the embeddings through the
    model."""
    embedding = model.get_input_embeddings()
    prefix = next(name for name, module in model.named_modules() if module is embedding)
    embedding_names = {name: f"{prefix}.{name}" for name, _ in embedding.named_parameters()}

    def log_prob(
        params: Tensors, frozen: Tensors, input_ids: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        weights = {
            name: params[full] if full in params else frozen[full]
            for name, full in embedding_names.items()
        }
        embeds = functional_call(embedding, weights, (input_ids[None],))
        inputs = {"inputs_embeds": embeds}
        logits = functional_call(model, (params, frozen), args=(), kwargs=inputs).logits[0, :-1]
        targets = labels[1:]
        token_log_probs = logits.log_softmax(dim=-1).gather(-1, targets.clamp(min=0)[:, None])
        return torch.where(targets != IGNORE_INDEX, token_log_probs[:, 0], 0.0).sum()

    return log_prob


@torch.no_grad()
def _sampled_labels(
    model: nn.Module,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    samples: int,
    generator: torch.Generator,
    passes: SamplesPerPass | None,
    params: Tensors,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row repeated ``samples`` times (row i's draws at rows i * samples ...), its answer
    labels replaced by tokens drawn from the model's predictive distribution at each answer
    position, given the row's true tokens before it (teacher forcing; each position drawn
    independently). Rows come prepared (:func:`_prepare_batch`: real tokens first, no mask);
    the forward passes that predict them run in ``passes`` as the gradients' do (``params``:
    the chosen parameters, for :func:`_halve`'s message).

    Why this is the model's Fisher: with y_t ~ p(. | x_<t) independent across positions, the
    squared gradient of sum_t log p(y_t) has expectation sum_t E[g_t^2], the cross terms
    vanishing as E[g_t] = 0; the Fisher is the sum over positions of each position's Fisher,
    as the empirical one sums the true labels' log-probabilities.
    """
    answer = labels[:, 1:] != IGNORE_INDEX
    found: list[torch.Tensor] = []

    def predict(rows: slice) -> None:
        embeds = model.get_input_embeddings()(input_ids[rows])
        logits = model(inputs_embeds=embeds).logits[:, :-1]
        probs = logits[answer[rows]].float().softmax(dim=-1).cpu()
        # drawn pass by pass, position after position: the same draws as all at once, and only
        # one pass's probabilities (positions x vocabulary) held at a time
        found.append(torch.multinomial(probs, samples, replacement=True, generator=generator))

    _in_passes(len(input_ids), passes, params, predict)
    drawn = torch.cat(found)
    targets = labels[:, 1:, None].expand(-1, -1, samples).clone()
    targets[answer] = drawn.to(targets.device)
    first = labels[:, :1, None].expand(-1, -1, samples)
    sampled = torch.cat([first, targets], dim=1).permute(0, 2, 1).reshape(-1, labels.shape[1])
    return input_ids.repeat_interleave(samples, dim=0), sampled


def _prepare_batch(
    batch: Mapping[str, torch.Tensor], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Check a batch and return (input_ids, labels) on ``device`` with each row's real tokens
    moved to its start, labels -100 everywhere after them (see the module doc)."""
    missing = [key for key in BATCH_KEYS if key not in batch]
    if missing:
        raise ValueError(f"batch lacks {missing}: expected keys {list(BATCH_KEYS)}")
    input_ids, padding, labels = (batch[key].to(device) for key in BATCH_KEYS)
    if input_ids.ndim != 2 or padding.shape != input_ids.shape or labels.shape != input_ids.shape:
        raise ValueError(
            "input_ids, attention_mask and labels must share one (batch, length) shape, got "
            f"{tuple(input_ids.shape)}, {tuple(padding.shape)} and {tuple(labels.shape)}"
        )
    real = padding.bool()
    positions = torch.arange(input_ids.shape[1], device=device)
    lengths = real.sum(dim=1, keepdim=True)
    starts = real.int().argmax(dim=1, keepdim=True)  # the first real token (0 in an empty row)
    if not torch.equal(real, (positions >= starts) & (positions < starts + lengths)):
        raise ValueError("each row's real tokens (attention_mask 1) must be contiguous")
    moved = (positions + starts) % input_ids.shape[1]
    labels = torch.where(positions < lengths, labels.gather(1, moved), IGNORE_INDEX)
    return input_ids.gather(1, moved), labels


def fisher_summary(
    fisher: Mapping[int, torch.Tensor],
    reference: Mapping[int, torch.Tensor] | None = None,
) -> dict[int, dict[str, float | list[int]]]:
    """Per-layer summary of a diagonal Fisher, comparable across models.

    For each layer: ``mean``; quantiles ``q50``, ``q90``, ``q99``; ``log10_hist``, the counts of
    log10(F) in the bins of :data:`FISHER_LOG10_EDGES` (zeros and tiny values land in the first
    bin); with a ``reference`` (the original model's Fisher), ``mean_ratio`` = mean / reference
    mean (NaN where the reference mean is 0).
    """
    low, high = 10.0 ** FISHER_LOG10_EDGES[0], 10.0 ** FISHER_LOG10_EDGES[-1]
    summary: dict[int, dict[str, float | list[int]]] = {}
    for layer, values in fisher.items():
        values = values.double().cpu().numpy()
        quantiles = np.quantile(values, FISHER_QUANTILES)
        log_values = np.log10(np.clip(values, low, high))
        counts, _ = np.histogram(log_values, bins=FISHER_LOG10_EDGES)
        entry: dict[str, float | list[int]] = {"mean": float(values.mean())}
        for q, value in zip(FISHER_QUANTILES, quantiles, strict=True):
            entry[f"q{round(q * 100)}"] = float(value)
        entry["log10_hist"] = counts.tolist()
        if reference is not None:
            if layer not in reference:
                raise ValueError(f"layer {layer} is missing from the reference Fisher")
            reference_mean = float(reference[layer].double().mean())
            entry["mean_ratio"] = entry["mean"] / reference_mean if reference_mean else np.nan
        summary[layer] = entry
    return summary


def fisher_weighted_distance(
    fisher0: Mapping[int, torch.Tensor], model: nn.Module, model0: nn.Module
) -> dict[int, float]:
    """sum_j F0_j (theta_j - theta0_j)^2 per layer of ``fisher0``, in float64.

    ``fisher0`` is the original model's :func:`fisher_diagonal`, ``model0`` the original and
    ``model`` the candidate: a second-order estimate of how much the edit moved the original's
    log-likelihood (large where the moved weights mattered to it). The sums of
    :func:`fisher_weighted_terms` over each layer's parameters.
    """
    return sum_by_layer(fisher_weighted_terms(fisher0, model, model0), model0)


@torch.no_grad()
def fisher_weighted_terms(
    fisher0: Mapping[int, torch.Tensor], model: nn.Module, model0: nn.Module
) -> Iterator[tuple[str, float]]:
    """(name, sum_j F0_j (theta_j - theta0_j)^2 over the parameter's values) for each parameter
    of the layers of ``fisher0``, in float64, after checking that each layer's Fisher has one
    value per parameter (see :func:`fisher_weighted_distance`)."""
    sizes = {
        layer: sum(param.numel() for _, param in params)
        for layer, params in layer_parameters(model0).items()
    }
    for layer, values in fisher0.items():
        if layer not in sizes:
            raise ValueError(f"layer {layer} of the Fisher does not exist in the model")
        if values.numel() != sizes[layer]:
            raise ValueError(
                f"layer {layer}: the Fisher has {values.numel()} values, "
                f"the model's layer has {sizes[layer]} parameters"
            )
    offsets = dict.fromkeys(fisher0, 0)
    for layer, name, theta0, theta in paired_parameters(model0, model):
        if layer not in fisher0:
            continue
        start, size = offsets[layer], theta0.numel()
        diff = (theta.double() - theta0.double()).ravel()
        weights = fisher0[layer][start : start + size].to(diff.device, torch.float64)
        yield name, float((weights * diff.square()).sum())
        offsets[layer] = start + size
