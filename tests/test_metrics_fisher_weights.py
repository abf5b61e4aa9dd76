"""Diagonal Fisher against single-sample backward passes; layer grouping; weight change."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from unlearning_audit.metrics import (
    FISHER_LOG10_EDGES,
    fisher_diagonal,
    fisher_summary,
    fisher_weighted_distance,
    layer_parameters,
    weight_change,
)

pytestmark = [
    pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning"),
    pytest.mark.usefixtures("one_torch_thread"),
]

VOCAB = 64


def tiny_llama(seed: int = 0, layers: int = 3, **overrides) -> LlamaForCausalLM:
    """A random Llama small enough for float64 gradients in milliseconds."""
    torch.manual_seed(seed)
    sizes = {"vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 64}
    config = LlamaConfig(
        **(sizes | overrides),
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
    )
    return LlamaForCausalLM(config).double()


def make_batch(seed: int, lengths: list[int], prompt: int, width: int, left: bool = False) -> dict:
    """Padded batch: each row has ``lengths[i]`` real tokens, the first ``prompt`` of them
    prompt (labels -100); pads (token 0, labels -100) on the right, or the left."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.zeros(len(lengths), width, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    labels = torch.full_like(input_ids, -100)
    for row, length in enumerate(lengths):
        real = slice(width - length, width) if left else slice(0, length)
        input_ids[row, real] = torch.randint(1, VOCAB, (length,), generator=generator)
        attention_mask[row, real] = 1
        answer = slice(real.start + prompt, real.stop)
        labels[row, answer] = input_ids[row, answer]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def batches() -> list[dict]:
    return [
        make_batch(1, [9, 6, 7], prompt=3, width=9),
        make_batch(2, [5, 12], prompt=2, width=12),
        make_batch(3, [8, 5], prompt=3, width=8, left=True),
    ]


def looped_fisher(model: LlamaForCausalLM, batch_list: list[dict]) -> dict[int, torch.Tensor]:
    """Reference: one ordinary backward pass per sample through the unmodified model."""
    model.eval()
    groups = layer_parameters(model)
    sums = {name: torch.zeros_like(p) for name, p in model.named_parameters()}
    count = 0
    for batch in batch_list:
        for row in range(batch["input_ids"].shape[0]):
            sample = {key: value[row : row + 1] for key, value in batch.items()}
            model.zero_grad()
            logits = model(
                input_ids=sample["input_ids"], attention_mask=sample["attention_mask"]
            ).logits[0, :-1]
            targets = sample["labels"][0, 1:]
            keep = targets != -100
            log_probs = logits.log_softmax(-1)[keep, targets[keep]]
            log_probs.sum().backward()
            for name, param in model.named_parameters():
                sums[name] += param.grad**2
            count += 1
    return {
        layer: torch.cat([sums[name].ravel() / count for name, _ in params])
        for layer, params in groups.items()
    }


def test_fisher_equals_a_loop_of_single_sample_backward_passes() -> None:
    model = tiny_llama()
    model.train()
    fisher = fisher_diagonal(model, batches())
    assert model.training, "the model's mode must be restored"
    reference = looped_fisher(model, batches())
    assert sorted(fisher) == [0, 1, 2, 3, 4]
    for layer, values in fisher.items():
        assert values.dtype == torch.float32 and values.device.type == "cpu"
        torch.testing.assert_close(values.double(), reference[layer], rtol=1e-6, atol=1e-30)
        assert values.abs().sum() > 0


def test_float32_fisher_runs_eager_attention_and_matches_the_loop() -> None:
    model = tiny_llama().float()
    assert model.config._attn_implementation == "sdpa"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fisher = fisher_diagonal(model, batches())
    assert not [w for w in caught if "performance drop" in str(w.message)], "sdpa under vmap"
    assert model.config._attn_implementation == "sdpa", "the attention must be restored"
    reference = looped_fisher(model, batches())
    for layer, values in fisher.items():
        scale = float(reference[layer].abs().max())
        torch.testing.assert_close(values, reference[layer], rtol=1e-4, atol=1e-5 * scale)


def test_fisher_squares_per_sample_gradients_not_the_batch_gradient() -> None:
    model = tiny_llama()
    one_batch = [make_batch(4, [7, 7, 7, 7], prompt=2, width=7)]
    fisher = fisher_diagonal(model, one_batch)[1]
    model.zero_grad()
    batch = one_batch[0]
    logits = model(input_ids=batch["input_ids"]).logits[:, :-1]
    targets = batch["labels"][:, 1:]
    keep = targets != -100
    log_probs = logits.log_softmax(-1)[keep, targets[keep]]
    (log_probs.sum() / 4).backward()
    squared_mean_gradient = torch.cat(
        [p.grad.ravel() ** 2 for _, p in layer_parameters(model)[1]]
    ).float()
    assert not torch.allclose(fisher, squared_mean_gradient, rtol=0.1)


def test_pad_tokens_do_not_change_the_fisher() -> None:
    model = tiny_llama()
    original = batches()
    repadded = batches()
    for batch in repadded:
        pads = batch["attention_mask"] == 0
        batch["input_ids"][pads] = torch.randint(1, VOCAB, (int(pads.sum()),))
    fisher, fisher_repadded = fisher_diagonal(model, original), fisher_diagonal(model, repadded)
    for layer in fisher:
        torch.testing.assert_close(fisher_repadded[layer], fisher[layer], rtol=1e-6, atol=0)


def test_layer_restriction_matches_the_full_computation_and_checks_indices() -> None:
    model = tiny_llama()
    full = fisher_diagonal(model, batches())
    partial = fisher_diagonal(model, batches(), layers=[3, 1])
    assert sorted(partial) == [1, 3]
    for layer in partial:
        torch.testing.assert_close(partial[layer], full[layer], rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match=r"layer \[7\] does not exist"):
        fisher_diagonal(model, batches(), layers=[1, 7])
    with pytest.raises(ValueError, match="batches is empty"):
        fisher_diagonal(model, [])
    with pytest.raises(ValueError, match=r"lacks \['labels'\]"):
        fisher_diagonal(model, [{k: v for k, v in batches()[0].items() if k != "labels"}])
    holed = batches()[0]
    holed["attention_mask"][0, 4] = 0  # a pad between real tokens
    with pytest.raises(ValueError, match="must be contiguous"):
        fisher_diagonal(model, [holed])


def test_tied_embeddings_are_counted_once_under_layer_zero() -> None:
    model = tiny_llama(tie_word_embeddings=True)
    groups = layer_parameters(model)
    assert [name for name, _ in groups[0]] == ["model.embed_tokens.weight"]
    assert [name for name, _ in groups[4]] == ["model.norm.weight"]
    fisher = fisher_diagonal(model, batches(), layers=[0])
    torch.testing.assert_close(
        fisher[0].double(), looped_fisher(model, batches())[0], rtol=1e-6, atol=1e-30
    )


def test_block_one_never_picks_up_block_ten() -> None:
    model = tiny_llama(layers=12)
    groups = layer_parameters(model)
    block_one = {name for name, _ in model.named_parameters() if name.startswith("model.layers.1.")}
    assert {name for name, _ in groups[2]} == block_one
    assert all(name.startswith("model.layers.10.") for name, _ in groups[11])
    fisher = fisher_diagonal(model, batches()[:1], layers=[2])
    assert fisher[2].numel() == sum(p.numel() for _, p in groups[2])


def test_fisher_summary_statistics_and_ratio() -> None:
    values = torch.tensor([0.0, 1e-3, 1e-3, 1.0, 2.0], dtype=torch.float32)
    summary = fisher_summary({0: values}, reference={0: values * 4})[0]
    assert summary["mean"] == pytest.approx(float(values.double().mean()))
    assert summary["q50"] == pytest.approx(1e-3)
    assert summary["q90"] == pytest.approx(np.quantile(values.double().numpy(), 0.9))
    assert summary["mean_ratio"] == pytest.approx(0.25)
    hist = summary["log10_hist"]
    assert len(hist) == len(FISHER_LOG10_EDGES) - 1 and sum(hist) == 5
    assert hist[0] == 1  # the zero
    assert hist[list(FISHER_LOG10_EDGES).index(-3.0)] == 2
    with pytest.raises(ValueError, match="layer 0 is missing"):
        fisher_summary({0: values}, reference={1: values})


def perturbed_copy(model: LlamaForCausalLM, name: str, delta: torch.Tensor) -> LlamaForCausalLM:
    other = tiny_llama()
    other.load_state_dict(model.state_dict())
    with torch.no_grad():
        dict(other.named_parameters())[name].add_(delta)
    return other


def test_weight_change_is_zero_for_identical_models_and_exact_for_a_known_edit() -> None:
    model = tiny_llama()
    assert weight_change(model, tiny_llama()) == dict.fromkeys(range(5), 0.0)
    name = "model.layers.1.mlp.down_proj.weight"
    delta = torch.full((32, 64), 0.01, dtype=torch.float64)
    change = weight_change(model, perturbed_copy(model, name, delta))
    layer_norm = torch.cat(
        [p.detach().ravel() for n, p in model.named_parameters() if n.startswith("model.layers.1.")]
    )
    expected = 0.01 * (32 * 64) ** 0.5 / float(layer_norm.norm())
    assert change[2] == pytest.approx(expected, rel=1e-12)
    assert {layer: value for layer, value in change.items() if layer != 2} == {
        0: 0.0,
        1: 0.0,
        3: 0.0,
        4: 0.0,
    }


def test_fisher_weighted_distance_weights_each_change_by_the_original_fisher() -> None:
    model = tiny_llama()
    fisher0 = fisher_diagonal(model, batches())
    name = "model.layers.0.self_attn.q_proj.weight"
    delta = torch.linspace(-0.1, 0.1, 32 * 32, dtype=torch.float64).reshape(32, 32)
    distance = fisher_weighted_distance(fisher0, perturbed_copy(model, name, delta), model)
    offset = 0
    for other, param in layer_parameters(model)[1]:
        if other == name:
            break
        offset += param.numel()
    weights = fisher0[1][offset : offset + delta.numel()].double()
    assert distance[1] == pytest.approx(float((weights * delta.ravel() ** 2).sum()), rel=1e-12)
    assert distance[1] > 0
    assert {layer: value for layer, value in distance.items() if layer != 1} == dict.fromkeys(
        [0, 2, 3, 4], 0.0
    )
    with pytest.raises(ValueError, match="layer 9 of the Fisher does not exist"):
        fisher_weighted_distance({9: fisher0[1]}, model, model)


def test_models_with_different_parameters_are_refused() -> None:
    model = tiny_llama()
    with pytest.raises(ValueError, match=r"different shapes: model\.layers\.0\.mlp"):
        weight_change(model, tiny_llama(intermediate_size=48))
    with pytest.raises(ValueError, match=r"only in the first model: model\.layers\.2\."):
        weight_change(model, tiny_llama(layers=2))
