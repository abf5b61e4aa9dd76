"""LoRA in every training stage: the NPO/KL reference read from the adapted weights themselves (no
second copy, peak memory measured through torch's dispatcher), relearning with an adapter, adapters
stored alone and merged into their base when loaded, gradient checkpointing."""

from __future__ import annotations

import copy
import json
import sys

import archs
import pytest
import torch
import transformers
from memory import PeakMemory
from prefect.logging import disable_run_logger

from tasks._stage import BASE, load_model, load_sets
from tasks.data import prepare_data
from tasks.evaluate import evaluate
from tasks.relearn import relearn
from tasks.unlearn import unlearn
from unlearning_audit import adapters, checkpoints, prompts, relearning, runtime, unlearning
from unlearning_audit.config import (
    AuditParams,
    DataConfig,
    EmbeddedConfig,
    RelearnConfig,
    UnlearnConfig,
)
from unlearning_audit.preflight import _checkpointing_problems, _lora_problems
from unlearning_audit.store import ArtifactRef, Store


@pytest.fixture(scope="module")
def facts(tmp_path_factory):
    """Facts (a town's flag colour) as forget and retain files, and a tokenizer for them."""
    rows = archs.flag_facts(32)
    root = tmp_path_factory.mktemp("lora")
    sets = {"forget": rows[:16], "retain": rows[16:]}
    for name, part in sets.items():
        (root / f"{name}.json").write_text(json.dumps(part))
    runtime.setup(0, "cpu")
    tok = archs.tokenizer([prompts.QA_TEMPLATE.format(**r) for r in rows])
    return root, sets, tok


def _wide_llama(tok) -> transformers.LlamaForCausalLM:
    """A random Llama whose weights (10.5M parameters, 42 MB) dwarf a small batch's activations,
    so a second copy of it shows in peak memory."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=len(tok),
        hidden_size=512,
        intermediate_size=1024,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=8,
        pad_token_id=tok.pad_token_id,
    )
    return transformers.LlamaForCausalLM(config).eval()


def _peak_extra(model, tok, sets, config: UnlearnConfig) -> int:
    """Peak bytes of tensors allocated while ``config`` unlearns a copy of ``model``, above its
    weights (tests/memory.py: every allocation counted through torch's dispatcher)."""
    trained = copy.deepcopy(model)
    with PeakMemory() as memory:
        unlearning.unlearn(trained, prompts.renderer(tok), sets, config, seed=0)
    return memory.peak


def test_lora_npo_kl_reads_its_reference_without_a_copy(facts):
    """NPO+KL needs the frozen original. Trained in full it holds a copy of the model: its peak
    is GA's plus about one model (and the retain batch's activations). With LoRA the adapter's
    own base serves: NPO+KL's peak is LoRA GA's plus the retain activations alone, and the
    whole run stays under one model above the weights (no gradients or AdamW state for them)."""
    _, sets, tok = facts
    model = _wide_llama(tok)
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    common = {"lr": 1e-4, "steps": 2, "batch_size": 2}
    peak = {
        f"{method}{' LoRA' if rank else ''}": _peak_extra(
            model, tok, sets, UnlearnConfig(method=method, lora_rank=rank, **common)
        )
        for method in ("GA", "NPO+KL")
        for rank in (None, 8)
    }
    print({k: round(v / size, 2) for k, v in peak.items()}, "model sizes above the weights")
    assert peak["NPO+KL"] - peak["GA"] > 0.9 * size  # the tracker sees the reference copy
    assert peak["NPO+KL LoRA"] - peak["GA LoRA"] < 0.5 * size
    assert peak["NPO+KL LoRA"] < size < 3 * size < peak["GA"]


def test_the_frozen_reference_is_the_original_while_the_adapter_trains(facts):
    """After LoRA steps the adapted model has moved, and its base called through Frozen still
    gives the original's logits exactly."""
    _, sets, tok = facts
    model = archs.model("llama", tok)
    original = copy.deepcopy(model)
    wrapped = adapters.wrap(model, 4)
    reference = adapters.Frozen(wrapped)
    fmt = prompts.renderer(tok)
    batch = unlearning.data.train_batch(fmt, sets["forget"][:4])
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    optimizer = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        wrapped.train()
        (-unlearning.training.mean_nll(wrapped, batch)).backward()
        optimizer.step()
        optimizer.zero_grad()
    with torch.no_grad():
        expected = original(**inputs).logits
        assert not torch.allclose(wrapped(**inputs).logits, expected)
    wrapped.train()
    assert torch.equal(reference(**inputs).logits, expected)
    assert wrapped.training  # the training mode is given back
    assert not adapters.is_wrapped(original)


def test_lora_relearning_trains_an_adapter_and_merges_it(facts):
    """Relearning with lora_rank returns the adapter and leaves the model merged: only the
    blocks' linear layers moved, the curve was recorded at every curve step."""
    _, sets, tok = facts
    model = archs.model("llama", tok)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    forget = [{**r, "id": f"f{i}"} for i, r in enumerate(sets["forget"])]
    full = {**sets, "forget": forget, "forget_a": forget[:8], "forget_b": forget[8:]}
    config = RelearnConfig(lr=1e-2, lora_rank=4, batch_size=4)
    log = relearning.relearn(model, prompts.renderer(tok), full, "forget", config, seed=0)
    assert isinstance(log["adapter"], adapters.Adapter)
    assert [p["step"] for p in log["curve"]] == relearning.curve_steps(log["steps"])
    after = dict(model.named_parameters())
    assert set(after) == set(before)
    changed = [n for n in before if not torch.equal(before[n], after[n].detach())]
    assert changed and all("proj" in n for n in changed)


def _stage(task, *args, **kwargs) -> ArtifactRef:
    """A stage task run as a plain function; its artifact."""
    with disable_run_logger():
        out = task.fn(*args, **kwargs)
    return out if isinstance(out, ArtifactRef) else out.data


def test_stages_store_adapters_alone_and_load_them_merged(facts, tmp_path, monkeypatch):
    """With LoRA, the unlearn stage stores the adapter alone (a few KB, no model weights) and
    relearning on it stores its own adapter on top; loading either merges the chain into the
    bf16 original, giving the weights the stage trained (up to bf16 rounding); evaluation and
    a relearned adapter's curve read it like any checkpoint."""
    monkeypatch.setattr("tasks._progress.create_progress_artifact", lambda *a, **k: None)
    root, _, tok = facts
    net = archs.model("llama", tok).to(torch.bfloat16)
    archs.save(net, tok, root / "bf16")
    url = str(tmp_path / "store")
    store = Store(url)
    config = DataConfig(forget=str(root / "forget.json"), retain=str(root / "retain.json"))
    data_ref = _stage(prepare_data, url, config, EmbeddedConfig())
    original = store.cached(
        "checkpoint", {"name": "bf16"}, {}, "v", lambda out: archs.save(net, tok, out) and None
    )[0]
    method = UnlearnConfig(method="NPO+KL", lr=1e-2, steps=3, batch_size=4, lora_rank=4)
    unlearned = _stage(unlearn, url, original, data_ref, method, device="cpu")
    files = set(store.manifest(unlearned.key)["files"])
    assert files == {adapters.CONFIG, adapters.WEIGHTS, BASE, "unlearn.json"}
    assert store.manifest(unlearned.key)["meta"]["dtype"] == "torch.bfloat16"

    runtime.setup(0, "cpu")  # as the stage: seeded, then loaded (LoRA's init draws from it)
    expected, tokenizer = checkpoints.load(root / "bf16", "cpu")
    fmt = prompts.renderer(tokenizer)
    trained = unlearning.unlearn(expected, fmt, load_sets(store, data_ref), method, seed=0)
    loaded, _ = load_model(store, unlearned, "cpu")
    assert loaded.dtype == torch.bfloat16
    for (name, got), want in zip(loaded.named_parameters(), expected.parameters(), strict=True):
        torch.testing.assert_close(got, want, rtol=1.6e-2, atol=1e-3, msg=name)
    assert trained["adapter"] is not None

    evaluated = _stage(evaluate, url, unlearned, data_ref, max_rows=8, device="cpu")
    assert store.read_json(evaluated, "evaluation.json")["dtype"] == "torch.bfloat16"
    relearn_config = RelearnConfig(lr=1e-2, lora_rank=4, batch_size=4)
    relearned = _stage(
        relearn, url, unlearned, data_ref, "forget", relearn_config, device="cpu", max_rows=8
    )
    assert adapters.CONFIG in store.manifest(relearned.key)["files"]
    stacked, _ = load_model(store, relearned, "cpu")
    moved = [
        n
        for (n, a), b in zip(stacked.named_parameters(), loaded.parameters(), strict=True)
        if not torch.equal(a, b)
    ]
    assert moved and all("proj" in n for n in moved)


def test_gradient_checkpointing_gives_the_same_training(facts):
    """Recomputing activations changes memory, not results: the same losses and weights (float64,
    to 1e-10); a model without support is refused by name."""
    _, sets, tok = facts
    fmt = prompts.renderer(tok)
    runs = []
    for checkpointing in (False, True):
        active = []
        model = archs.model("llama", tok).double()
        log = unlearning.unlearn(
            model,
            fmt,
            sets,
            UnlearnConfig(method="GA+GD", lr=1e-3, steps=3, batch_size=4),
            seed=0,
            progress=lambda step, steps, m=model, seen=active: seen.append(_checkpointing(m)),
            checkpointing=checkpointing,
        )
        assert active == [checkpointing] * 3
        runs.append((log["losses"], [p.detach() for p in model.parameters()]))
        assert not _checkpointing(model)
    (loss_a, weights_a), (loss_b, weights_b) = runs
    assert loss_a == pytest.approx(loss_b, rel=1e-10)
    for a, b in zip(weights_a, weights_b, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)

    class NoSupport(torch.nn.Module):
        supports_gradient_checkpointing = False

    with pytest.raises(ValueError, match="NoSupport does not support gradient checkpointing"):
        unlearning.training.check_checkpointing(NoSupport())


def _checkpointing(model) -> bool:
    """Whether any module of ``model`` recomputes its activations in the backward pass."""
    return any(getattr(m, "gradient_checkpointing", False) for m in model.modules())


def test_preflight_refuses_checkpointing_a_model_class_without_it(tmp_path):
    """CTRL's transformers class has no gradient checkpointing: refused from config.json alone,
    before a model is built; a Llama passes."""
    for name, config in (
        ("ctrl", transformers.CTRLConfig()),
        ("llama", transformers.LlamaConfig()),
    ):
        config.save_pretrained(tmp_path / name)
    params = AuditParams(gradient_checkpointing=True)
    assert _checkpointing_problems(params, tmp_path / "ctrl") == [
        "gradient_checkpointing: CTRLLMHeadModel does not support it; leave it off"
    ]
    assert _checkpointing_problems(params, tmp_path / "llama") == []
    assert _checkpointing_problems(AuditParams(), tmp_path / "ctrl") == []


def test_relearning_lora_without_peft_is_refused(monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # as if peft were not installed
    params = AuditParams(relearn=RelearnConfig(lora_rank=4))
    assert _lora_problems(params) == [
        "lora_rank: relearning train LoRA adapters, which needs peft: "
        "pip install 'unlearning-audit[lora]'"
    ]
