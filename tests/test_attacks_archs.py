"""Quantization and the Fisher on every architecture of archs.ARCHS: what the attacks touch,
checked against the modules' own layouts and against ordinary single-sample backward passes;
and the stages on an OPT checkpoint, the probe stage skipping labels without signal."""

from __future__ import annotations

import copy
import json

import archs
import pytest
import torch
import transformers
from prefect import flow
from torch import nn
from transformers.pytorch_utils import Conv1D

from tasks.checkpoint import fetch_checkpoint
from tasks.data import prepare_data
from tasks.evaluate import evaluate
from tasks.extract import extract
from tasks.fisher import fisher, read_fisher
from tasks.probe import probe
from tasks.verdict import best_probe, read_probes
from unlearning_audit import data, prompts, quantization
from unlearning_audit.config import DataConfig
from unlearning_audit.metrics import fisher_diagonal, layer_parameters
from unlearning_audit.metrics.fisher import UnsupportedModel
from unlearning_audit.store import ArtifactRef, Store

pytestmark = [
    pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning"),
    pytest.mark.usefixtures("one_torch_thread"),
]

ROWS = [
    {"question": "Which colour is the flag of town 1?", "answer": "red"},
    {"question": "Who founded town 2?", "answer": "a miller from the northern valley"},
    {"question": "How old is town 3?", "answer": "four hundred years"},
]
BITS = 3


@pytest.fixture(scope="module")
def fmt() -> prompts.Renderer:
    return prompts.renderer(archs.tokenizer([prompts.QA_TEMPLATE.format(**r) for r in ROWS]))


def linear_layers(net: nn.Module) -> dict[str, nn.Module]:
    """The modules whose weight multiplies activations: nn.Linear and GPT-2's Conv1D, less
    the LM head."""
    head = net.get_output_embeddings()
    return {
        name: module
        for name, module in net.named_modules()
        if isinstance(module, nn.Linear | Conv1D) and module is not head
    }


def most_levels(weight: torch.Tensor, conv1d: bool) -> int:
    """The most distinct values in one output channel: a row of an (out, in) weight, a column
    of a Conv1D's (in, out) one."""
    channels = weight.T if conv1d else weight
    return max(len(torch.unique(channel)) for channel in channels)


@pytest.mark.parametrize("arch", archs.ARCHS)
def test_quantization_rounds_every_linear_weight_per_output_channel(arch, fmt):
    net = archs.model(arch, fmt.tokenizer)
    before = {name: p.detach().clone() for name, p in net.named_parameters()}
    layers = linear_layers(net)
    assert quantization.quantize_model(net, BITS) == len(layers) > 0
    quantized = set()
    for name, module in layers.items():
        conv1d = isinstance(module, Conv1D)
        assert most_levels(module.weight, conv1d) <= 2**BITS, name
        assert not torch.equal(module.weight, before[f"{name}.weight"]), name
        quantized.add(f"{name}.weight")
    for name, param in net.named_parameters():  # embeddings, head, norms, biases, positions
        if name not in quantized:
            assert torch.equal(param, before[name]), name
    if arch == "gpt2":
        assert all(isinstance(m, Conv1D) for m in layers.values())


@pytest.mark.parametrize("arch", ["gpt2", "llama"])  # tied, untied
def test_embeddings_and_head_are_quantized_only_when_asked(arch, fmt):
    net = archs.model(arch, fmt.tokenizer)
    embedding, head = net.get_input_embeddings().weight, net.get_output_embeddings().weight
    tied = embedding is head
    assert tied == (arch == "gpt2")
    count = quantization.quantize_model(copy.deepcopy(net), BITS)
    assert quantization.quantize_model(net, BITS, embeddings=True) == count + (1 if tied else 2)
    for weight in (embedding, head):
        assert most_levels(weight, conv1d=False) <= 2**BITS


def test_routers_and_stacked_experts_are_quantized_per_expert_and_output_channel():
    """Mixtral keeps its experts as (experts, out, in) tensors applied with F.linear, and its
    router as a bare (experts, hidden) weight: each expert's rows are its output channels."""
    config = transformers.MixtralConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=3,
    )
    net = transformers.AutoModelForCausalLM.from_config(config)
    before = {name: p.detach().clone() for name, p in net.named_parameters()}
    linears, routers, experts = 4 * 2, 1 * 2, 2 * 3 * 2  # per block: qkvo; gate; gate_up, down
    assert quantization.quantize_model(net, BITS) == linears + routers + experts
    for name, param in net.named_parameters():
        if param.ndim == 1 or name in ("model.embed_tokens.weight", "lm_head.weight"):
            assert torch.equal(param, before[name]), name
        else:
            matrices = param.reshape(-1, *param.shape[-2:])
            assert max(most_levels(m, conv1d=False) for m in matrices) <= 2**BITS, name


def test_a_model_without_weight_matrices_is_refused(fmt):
    config = transformers.GPT2Config(n_embd=32, n_layer=0, n_head=4, vocab_size=len(fmt.tokenizer))
    net = transformers.GPT2LMHeadModel(config)  # embeddings, positions and the final norm only
    with pytest.raises(ValueError, match="no weight matrix to quantize"):
        quantization.quantize_model(net, BITS)
    assert quantization.quantize_model(net, BITS, embeddings=True) == 1  # the tied matrix


def left_padded(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same rows with their padding moved to the left."""
    pads = (batch["attention_mask"] == 0).sum(dim=1)
    return {
        key: torch.stack([row.roll(int(n)) for row, n in zip(value, pads, strict=True)])
        for key, value in batch.items()
    }


def looped_fisher(net: nn.Module, fmt: prompts.Renderer) -> dict[str, torch.Tensor]:
    """Reference: one ordinary backward pass per row, unpadded, through the unmodified model."""
    sums = {name: torch.zeros_like(p) for name, p in net.named_parameters()}
    for row in ROWS:
        batch = data.train_batch(fmt, [row])
        net.zero_grad()
        logits = net(input_ids=batch["input_ids"]).logits[0, :-1]
        targets = batch["labels"][0, 1:]
        keep = targets != -100
        logits.log_softmax(-1)[keep, targets[keep]].sum().backward()
        for name, p in net.named_parameters():
            sums[name] += p.grad.square() / len(ROWS)
    return sums


@pytest.mark.parametrize("arch", archs.ARCHS)
def test_fisher_is_the_same_padded_left_right_or_one_row_at_a_time(arch, fmt):
    net = archs.model(arch, fmt.tokenizer)
    batch = data.train_batch(fmt, ROWS)
    assert (batch["attention_mask"] == 0).any()
    right = fisher_diagonal(net, [batch])
    left = fisher_diagonal(net, [left_padded(batch)])
    alone = fisher_diagonal(net, [data.train_batch(fmt, [row]) for row in ROWS])
    reference = looped_fisher(net, fmt)
    for layer, params in layer_parameters(net).items():
        values = right[layer]
        assert torch.isfinite(values).all() and (values >= 0).all() and values.sum() > 0
        expected = torch.cat([reference[name].ravel() for name, _ in params])
        scale = float(expected.abs().max())
        for other in (values, left[layer], alone[layer]):
            torch.testing.assert_close(other, expected, rtol=1e-4, atol=1e-5 * scale)


class Branching(nn.Module):
    """A causal LM whose forward branches on its input's values, as some remote code does."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def get_input_embeddings(self) -> nn.Module:
        return self.inner.get_input_embeddings()

    def forward(self, inputs_embeds: torch.Tensor):
        scale = 2.0 if inputs_embeds.sum() > 0 else 1.0
        return self.inner(inputs_embeds=inputs_embeds * scale)


def test_a_model_that_cannot_run_under_vmap_is_unsupported_not_wrong(fmt):
    net = Branching(archs.model("llama", fmt.tokenizer))
    with pytest.raises(UnsupportedModel, match="Branching gives no per-sample gradients"):
        fisher_diagonal(net, [data.train_batch(fmt, ROWS)])


@flow
def _attack_stages(store: str, folder: str, config: DataConfig, embedded) -> dict[str, ArtifactRef]:
    """The Fisher, probe and quantized-evaluation stages of one checkpoint, as the audit calls
    them."""
    data_ref = prepare_data(store, config, embedded)
    checkpoint = fetch_checkpoint(store, folder, embedded)
    acts = extract(store, checkpoint, data_ref, None, 20, "cpu")
    return {
        "fisher": fisher(store, checkpoint, data_ref, device="cpu"),
        "probe": probe(store, data_ref, checkpoint, acts, 20),
        "quantized": evaluate(store, checkpoint, data_ref, 20, "cpu", bits=4, embeddings=True),
    }


def test_stages_on_opt_fisher_quantize_and_skip_probes_without_signal(
    prefect_server, tiny, fmt, tmp_path
):
    """Every answer's content is "red": a probe could learn nothing, so the stage says why."""
    sets = {
        name: [
            {"question": f"Which colour is the flag of town {i}?", "answer": "Red, like its roofs"}
            for i in range(start, start + 6)
        ]
        for name, start in (("forget", 0), ("retain", 6))
    }
    for name, rows in sets.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(rows))
    net = archs.model("opt", fmt.tokenizer)
    folder = archs.save(net, fmt.tokenizer, tmp_path / "opt")
    config = DataConfig(forget=str(tmp_path / "forget.json"), retain=str(tmp_path / "retain.json"))
    store = Store(str(tmp_path / "store"))
    refs = _attack_stages(store.url, str(folder), config, tiny)

    values = read_fisher(store, refs["fisher"])
    assert values and all(torch.isfinite(v).all() and (v >= 0).all() for v in values.values())
    skipped = store.manifest(refs["probe"].key)["meta"]["skipped"]
    assert "a probe needs 2 such classes" in skipped
    tables = read_probes(store, {"original": refs["probe"], "unlearned": refs["probe"]})
    assert tables == {} and best_probe(tables) == {}
    quantized = store.manifest(refs["quantized"].key)["meta"]["quantized_matrices"]
    assert quantized == len(linear_layers(net)) + 1  # the tied embeddings and head: one matrix
