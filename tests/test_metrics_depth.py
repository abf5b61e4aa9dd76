"""Depth shares (metrics.depth) on constructed weight changes, and the model's Fisher (labels
drawn from the model) against the exact expectation over the vocabulary."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from test_metrics_fisher_weights import batches, make_batch, tiny_llama

from unlearning_audit import plots, report
from unlearning_audit.metrics import (
    depth,
    fisher_diagonal,
    fisher_weighted_distance,
    layer_parameters,
    table,
)
from unlearning_audit.metrics.fisher import SamplesPerPass, fisher_weighted_terms
from unlearning_audit.metrics.weights import squared_changes

pytestmark = [
    pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning"),
    pytest.mark.usefixtures("one_torch_thread"),
]

BLOCKS = 3  # tiny_llama's default: layers 0 (embeddings), 1..3 (blocks), 4 (norm and head)


def edited(model, edits: dict[str, float]):
    """A copy of ``model`` (a tied matrix stays shared) with ``value`` added to every entry of
    each named parameter."""
    out = copy.deepcopy(model)
    params = dict(out.named_parameters())
    with torch.no_grad():
        for name, value in edits.items():
            params[name].add_(value)
    return out


def weight_parts(model0, model) -> depth.DepthParts:
    """The squared weight change by part, as the metrics stage computes it."""
    return depth.weight_depth(squared_changes(dict(model0.named_parameters()), model), model)


def fisher_parts(fisher0, model, model0) -> depth.DepthParts | None:
    """The Fisher-weighted distance by part, as the metrics stage computes it."""
    return depth.fisher_depth(fisher_weighted_terms(fisher0, model, model0), fisher0, model0)


def test_shares_of_hand_worked_parts() -> None:
    parts = depth.DepthParts(embeddings=1.0, blocks=(2.0, 3.0), head=4.0, tied=0.0)
    assert parts.share() == pytest.approx([0.4, 0.7, 0.9])
    assert parts.share(tied_as_head=False) == pytest.approx([0.4, 0.7, 0.9])
    tied = depth.DepthParts(embeddings=1.0, blocks=(2.0, 3.0), head=2.0, tied=2.0)
    assert tied.share() == pytest.approx([0.4, 0.7, 0.9])  # tied counted with the head
    assert tied.share(tied_as_head=False) == pytest.approx([2 / 8, 5 / 8, 7 / 8])
    assert tied.tied_share == pytest.approx(0.2)
    unchanged = depth.DepthParts(0.0, (0.0, 0.0), 0.0, 0.0)
    assert all(math.isnan(x) for x in unchanged.share()) and math.isnan(unchanged.tied_share)


def test_all_change_in_the_head_gives_share_one_for_every_k() -> None:
    model = tiny_llama()
    candidate = edited(model, {"lm_head.weight": 0.01, "model.norm.weight": -0.02})
    parts = weight_parts(model, candidate)
    assert parts.blocks == (0.0,) * BLOCKS and parts.embeddings == 0.0 and parts.tied == 0.0
    assert parts.head == pytest.approx(64 * 32 * 0.01**2 + 32 * 0.02**2, rel=1e-9)
    assert parts.share() == [1.0] * (BLOCKS + 1) == parts.share(tied_as_head=False)
    fisher0 = fisher_diagonal(model, batches())
    by_fisher = fisher_parts(fisher0, candidate, model)
    assert by_fisher.share() == [1.0] * (BLOCKS + 1)
    # the parts add up to the per-layer distance the metrics table reports
    distance = fisher_weighted_distance(fisher0, candidate, model)
    assert by_fisher.total == pytest.approx(sum(distance.values()), rel=1e-12)
    assert fisher_parts({4: fisher0[4]}, candidate, model) is None  # no whole to share


def test_all_change_in_block_zero_counts_only_once_every_block_is_in() -> None:
    model = tiny_llama()
    candidate = edited(model, {"model.layers.0.mlp.down_proj.weight": 0.01})
    for parts in (
        weight_parts(model, candidate),
        fisher_parts(fisher_diagonal(model, batches()), candidate, model),
    ):
        assert parts.share() == [0.0] * BLOCKS + [1.0]
    # an untied model's input embeddings are never in the share, not even at k = L
    embeddings = weight_parts(model, edited(model, {"model.embed_tokens.weight": 0.01}))
    assert embeddings.share() == [0.0] * (BLOCKS + 1)


def test_a_tied_head_is_its_own_part_not_the_embeddings() -> None:
    model = tiny_llama(tie_word_embeddings=True)
    name = "model.embed_tokens.weight"
    candidate = edited(model, {name: 0.01, "model.layers.0.mlp.down_proj.weight": 0.02})
    assert candidate.lm_head.weight is dict(candidate.named_parameters())[name]
    parts = weight_parts(model, candidate)
    tied, block = 64 * 32 * 0.01**2, 32 * 64 * 0.02**2
    assert parts.embeddings == 0.0 and parts.head == 0.0
    assert parts.tied == pytest.approx(tied, rel=1e-9)
    share = tied / (tied + block)
    assert parts.share() == pytest.approx([share] * BLOCKS + [1.0])  # counted as head
    assert parts.share(tied_as_head=False) == pytest.approx([0.0] * BLOCKS + [1.0])
    assert parts.tied_share == pytest.approx(share)
    rows = table.depth_rows(parts, None)
    summary = report.depth_summary(rows)
    assert summary["depth_share_top1"] == pytest.approx(share)
    assert summary["depth_share_untied_top1"] == pytest.approx(0.0)
    assert summary["depth_share"] == pytest.approx([share] * BLOCKS + [1.0])
    assert summary["tied_share"] == pytest.approx(share)
    assert summary["depth_share_fisher"] == [] and summary["depth_share_fisher_top1"] is None


def test_depth_rows_reach_the_report_table_and_figure() -> None:
    model = tiny_llama()
    candidate = edited(model, {"lm_head.weight": 0.01, "model.layers.2.mlp.up_proj.weight": 0.01})
    fisher0 = fisher_diagonal(model, batches())
    rows = table.depth_rows(weight_parts(model, candidate), fisher_parts(fisher0, candidate, model))
    _, lines = report._depth_table(rows)
    assert [line[0] for line in lines] == [0, 1, 2, 3, "tied matrix's own share"]
    assert lines[0][1] == pytest.approx(0.5) and lines[1][1] == 1.0  # head = block 2 here
    assert lines[-1][1] == 0.0 and 0 < lines[0][3] < 1
    assert report._depth_table(table.weight_rows({0: 0.1})) is None
    shares = {
        what: {"GA": (report._by_layer(rows, f"depth_share_{what}", ps), {})}
        for what, ps in (("weight", ""), ("fisher", "forget"))
    }
    assert plots.depth_share(shares).startswith(b"\x89PNG")


# -- the model's Fisher -----------------------------------------------------------------------


def peaked_llama(scale: float):
    """A one-block Llama whose head is scaled by ``scale``: the larger, the more peaked its
    predictions (at 100 most tokens are very unlikely under it)."""
    model = tiny_llama(layers=1)
    with torch.no_grad():
        model.lm_head.weight.mul_(scale)
    return model


def exact_model_fisher(model, batch_list: list[dict]) -> dict[int, torch.Tensor]:
    """Reference: sum over answer positions t and every token v of p_t(v) (d log p_t(v))^2,
    averaged over rows, from one backward pass per (position, token) of the unpadded row."""
    model.eval()
    groups = layer_parameters(model)
    params = [p for _, p in model.named_parameters()]
    sums = [torch.zeros_like(p) for p in params]
    rows = 0
    for batch in batch_list:
        for ids, mask, labels in zip(*(batch[k] for k in fisher_keys()), strict=True):
            real = mask.bool()
            log_probs = model(input_ids=ids[real][None]).logits[0, :-1].log_softmax(-1)
            for t in (labels[real][1:] != -100).nonzero()[:, 0].tolist():
                for v in range(log_probs.shape[1]):
                    grads = torch.autograd.grad(log_probs[t, v], params, retain_graph=True)
                    weight = log_probs[t, v].exp().detach()
                    for total, g in zip(sums, grads, strict=True):
                        total += weight * g.square()
            rows += 1
    by_name = {
        name: total / rows for (name, _), total in zip(model.named_parameters(), sums, strict=True)
    }
    return {
        layer: torch.cat([by_name[name].ravel() for name, _ in items])
        for layer, items in groups.items()
    }


def fisher_keys() -> tuple[str, str, str]:
    return ("input_ids", "attention_mask", "labels")


def short_batches() -> list[dict]:
    """Three rows of three answer tokens each, padded right and left."""
    return [
        make_batch(5, [6, 6], prompt=3, width=7),
        make_batch(6, [6], prompt=3, width=8, left=True),
    ]


def test_sampled_model_fisher_matches_the_exact_expectation_within_monte_carlo_error() -> None:
    # moderately peaked: a very peaked model's squares are heavy-tailed (rare tokens, huge
    # gradients), and a few hundred draws then underestimate the mean and its error alike
    model = peaked_llama(10.0)
    exact = exact_model_fisher(model, short_batches())
    seeds, draws = 6, 10
    estimates = [
        fisher_diagonal(model, short_batches(), labels="model", samples=draws, seed=seed)
        for seed in range(seeds)
    ]
    for layer, values in exact.items():
        totals = torch.tensor([float(e[layer].double().sum()) for e in estimates])
        error = float(totals.std()) / seeds**0.5  # standard error of the mean of the seeds
        assert abs(float(totals.mean()) - float(values.sum())) < 4 * error, layer
        assert error < 0.2 * float(values.sum())  # a test with teeth: the error is small
    # one draw sequence per seed: the same values whatever the pass size
    again = fisher_diagonal(
        model, short_batches(), None, SamplesPerPass(7), labels="model", samples=draws, seed=0
    )
    for layer, values in estimates[0].items():
        torch.testing.assert_close(again[layer], values, rtol=1e-5, atol=0)


def test_empirical_fisher_differs_where_the_labels_are_unlikely() -> None:
    model = peaked_llama(100.0)
    unlikely = short_batches()
    for batch in unlikely:  # each answer label the model's least likely token
        for row, (ids, mask) in enumerate(
            zip(batch["input_ids"], batch["attention_mask"], strict=True)
        ):
            real = mask.bool()
            with torch.no_grad():
                least = model(input_ids=ids[real][None]).logits[0].argmin(-1)
            answer = (batch["labels"][row] != -100).nonzero()[:, 0]
            positions = real.nonzero()[:, 0]
            start = int(positions[0])
            batch["labels"][row, answer] = least[answer - start - 1]
    empirical = fisher_diagonal(model, unlikely)
    sampled = fisher_diagonal(model, unlikely, labels="model", samples=20, seed=0)
    head = max(empirical)
    assert float(empirical[head].mean()) > 10 * float(sampled[head].mean())
    with pytest.raises(ValueError, match="labels must be one of"):
        fisher_diagonal(model, unlikely, labels="true")
