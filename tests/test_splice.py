"""The causal layer test (unlearning_audit/splice.py) on tiny models whose edit sits where the
test put it: restoring the edited block brings the forget set back, splicing it in loses it."""

from __future__ import annotations

import copy

import pytest
import torch

from tests import archs
from unlearning_audit import prompts, runtime, splice
from unlearning_audit.layers import decoder_blocks

ALPHA, RESAMPLES = 0.05, 400
A, B = splice.DIRECTIONS


def _sets() -> dict[str, list[dict]]:
    rows = [
        {**r, "group": f"pair-{i // 2}", "id": str(i)} for i, r in enumerate(archs.flag_facts(24))
    ]
    return {"forget": rows[:12], "retain": rows[12:]}


def _groups(sets: dict[str, list[dict]]) -> dict[str, list[str]]:
    return {name: [r["group"] for r in rows] for name, rows in sets.items()}


def _taught(arch: str):
    """A tiny ``arch`` model taught every fact, its renderer and the sets."""
    sets = _sets()
    texts = [prompts.QA_TEMPLATE.format(**r) for r in sets["forget"] + sets["retain"]]
    runtime.setup(0, "cpu")
    tok = archs.tokenizer(texts)
    net = archs.model(arch, tok)
    fmt = prompts.renderer(tok)
    archs.finetune(net, fmt, sets["forget"] + sets["retain"], 200)
    return net.eval(), fmt, sets


def _edited(original, fmt, sets, block: int | None):
    """A copy of ``original`` taught wrong forget answers (and the right retain ones), training
    only decoder block ``block``; None: every parameter but the input embeddings, unless the
    LM head shares them."""
    net = copy.deepcopy(original)
    _, blocks = decoder_blocks(net)
    for p in net.parameters():
        p.requires_grad_(block is None)
    if block is not None:
        blocks[block].requires_grad_(True)
    elif not splice.head_tied(net):
        net.get_input_embeddings().requires_grad_(False)
    colours = archs.COLOURS
    wrong = [
        {**r, "answer": colours[(colours.index(r["answer"]) + 1) % len(colours)]}
        for r in sets["forget"]
    ]
    archs.finetune(net, fmt, wrong + sets["retain"], 150)
    return net.requires_grad_(True).eval()


@pytest.fixture(scope="module")
def llama():
    return _taught("llama")


def _score(rows: list[dict], direction: str, k: int, name: str = "forget") -> float:
    return next(r for r in rows if r["direction"] == direction and r["k"] == k)[name]["score"]


@pytest.mark.parametrize("block", [1, 0])
def test_splicing_finds_the_block_the_edit_sits_in(llama, block):
    """An edit trained into the last block (1 of 2): restoring the top block (b, k = 1) brings
    the forget set back and splicing it into the original (a, k = 1) loses it. An edit in the
    first block: the top block changes nothing, and only k = 2 restores it."""
    original, fmt, sets = llama
    unlearned = _edited(original, fmt, sets, block)
    facts = splice.splice_facts(original, unlearned, fmt, sets, [1, 2], "exact_match")
    rows = splice.summarize(facts, _groups(sets), ALPHA, RESAMPLES)
    known, forgot = _score(rows, A, 0), _score(rows, B, 0)
    assert known >= 0.9 and forgot <= 0.2, (known, forgot)
    share = splice.restored_share(facts, _groups(sets)["forget"], ALPHA, RESAMPLES)
    if block == 1:
        assert _score(rows, B, 1) == known and _score(rows, A, 1) == forgot
        assert share["share"] == pytest.approx(1.0)
    else:
        assert _score(rows, B, 1) == forgot and _score(rows, A, 1) == known
        assert share["share"] == pytest.approx(0.0)
    assert _score(rows, B, 2) == known and _score(rows, A, 2) == forgot
    assert share["lower"] <= share["share"] <= share["upper"]
    for row in rows:
        for name in splice.SETS:
            cell = row[name]
            assert cell["lower"] <= cell["score"] <= cell["upper"] and cell["n"] == 12


def _params(net) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in net.named_parameters()}


@pytest.mark.parametrize("arch", ["llama", "gemma"])
def test_full_depth_splice_is_the_donor_but_for_the_embeddings(llama, arch):
    """At every k the spliced parameters equal the donor's exactly and the rest the
    recipient's, and both models come back unchanged. At k = L only the input embeddings are
    the recipient's (Llama; its edit left them alone), or nothing with a tied head (Gemma: its
    edit trained the shared matrix): each spliced model then scores exactly as the other."""
    original, fmt, sets = llama if arch == "llama" else _taught(arch)
    unlearned = _edited(original, fmt, sets, None)
    before = {A: _params(original), B: _params(unlearned)}
    donor = {A: before[B], B: before[A]}
    tied = splice.head_tied(original)
    assert tied == (arch == "gemma")
    embeddings = {
        n for n, p in original.named_parameters() if p is original.get_input_embeddings().weight
    }
    blocks = splice.n_blocks(original)
    for k in splice.splices(original, unlearned, range(1, blocks + 1)):
        chosen = set(splice.top_parameters(original, k))
        for direction, net in ((A, original), (B, unlearned)):
            for name, p in net.named_parameters():
                source = donor[direction] if name in chosen else before[direction]
                assert torch.equal(p, source[name]), (k, name)
    assert set(before[A]) - chosen == (set() if tied else embeddings)
    for direction, net in ((A, original), (B, unlearned)):
        assert all(torch.equal(p, before[direction][n]) for n, p in net.named_parameters())
    facts = splice.splice_facts(original, unlearned, fmt, sets, [blocks], "probability")
    rows = {(r["direction"], r["k"]): r for r in facts}
    for name in splice.SETS:
        for direction, other in ((A, B), (B, A)):
            spliced, target = rows[direction, blocks][name], rows[other, 0][name]
            assert spliced == target and spliced != rows[direction, 0][name], (name, direction)


def test_splicing_refuses_another_architecture_or_depth(llama):
    original, _, _ = llama
    wider = archs.model("gpt2", archs.tokenizer(["a b c"] * 4))
    with pytest.raises(ValueError, match="different parameters"):
        next(splice.splices(original, wider, [1]))
    with pytest.raises(ValueError, match="depths"):
        next(splice.splices(original, copy.deepcopy(original), [3]))


def test_restored_share_by_hand():
    """Forget facts: the original knows four, the unlearned model none, the top block restored
    brings back two: half the gap; a model that lost nothing has no share."""
    facts = [
        {"direction": A, "k": 0, "forget": [1.0, 1.0, 1.0, 1.0]},
        {"direction": B, "k": 0, "forget": [0.0, 0.0, 0.0, 0.0]},
        {"direction": A, "k": 1, "forget": [0.0, 0.0, 0.0, 0.0]},
        {"direction": B, "k": 1, "forget": [1.0, 1.0, 0.0, 0.0]},
    ]
    share = splice.restored_share(facts, ["g1", "g1", "g2", "g2"], ALPHA, RESAMPLES)
    assert share["share"] == 0.5
    # two groups: a resample holds g1 twice (1), g2 twice (0) or one of each (0.5)
    assert share["lower"] == 0.0 and share["upper"] == 1.0
    same = [{**r, "forget": [1.0] * 4} for r in facts]
    assert splice.restored_share(same, ["g1"] * 4, ALPHA, RESAMPLES) is None
    cell = splice.mean_interval([0.25] * 8, ["g"] * 8, ALPHA, RESAMPLES)
    assert cell == {"score": 0.25, "lower": 0.25, "upper": 0.25, "n": 8}


def test_plan_counts_both_models_and_suggests_no_splice(llama, tmp_path):
    """The splice stage holds two models: twice the evaluate stage's weights; on a device
    just too small for it, --no-splice is a setting that fits."""
    from unlearning_audit import plan
    from unlearning_audit.config import AuditParams

    original, fmt, _ = llama
    shape = plan.shape_of_folder(archs.save(original, fmt.tokenizer, tmp_path / "model"))
    spliced = plan.splice_estimate(shape, 64)
    evaluated = plan.evaluate_estimate(shape, 64)
    assert spliced.parts["weights"] == 2 * evaluated.parts["weights"] == 2 * 4 * shape.parameters
    assert spliced.peak - evaluated.peak == evaluated.parts["weights"]
    stages = {s.stage for s in plan.stage_estimates(AuditParams(), shape, 64, "fp32")}
    off = {s.stage for s in plan.stage_estimates(AuditParams(splice=False), shape, 64, "fp32")}
    assert stages - off == {"splice"}
    budget = spliced.peak - 1
    assert "--no-splice" in plan.fitting_settings(
        AuditParams(), shape, 64, "fp32", budget, "splice"
    )
