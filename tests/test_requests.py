"""Repeated unlearning requests: the parts each request unlearns, the order they train in, the
early stop per request, the label, the CLI flags and the preflight's refusal."""

from __future__ import annotations

import copy

import archs
import pytest
import torch

from unlearning_audit import cli, prompts, unlearning
from unlearning_audit.config import AuditParams, DataConfig, UnlearnConfig
from unlearning_audit.preflight import preflight

ROWS = [{**r, "id": str(i)} for i, r in enumerate(archs.flag_facts(7))]
SETS = {
    "forget": ROWS,
    "retain": [{**r, "id": f"r{i}"} for i, r in enumerate(archs.flag_facts(6, 1))],
}


@pytest.fixture(scope="module")
def net_and_format():
    """A random tiny Llama and the rendering of the flag facts for it."""
    tok = archs.tokenizer(
        [f"{r['question']} {r['answer']}" for r in SETS["forget"] + SETS["retain"]]
    )
    return archs.model("llama", tok), prompts.renderer(tok)


def _unlearned(net_and_format, sets: dict, config: UnlearnConfig, runs: int = 1):
    """A copy of the tiny model after ``runs`` calls of unlearn on ``sets``, and the last log."""
    net, fmt = net_and_format
    model = copy.deepcopy(net)
    for _ in range(runs):
        log = unlearning.unlearn(model, fmt, sets, config, seed=3)
    return model, log


def _same_weights(a, b) -> bool:
    theirs = b.state_dict()
    return all(torch.equal(x, theirs[name]) for name, x in a.state_dict().items())


def test_disjoint_parts_cover_the_forget_set_once_in_order():
    parts = unlearning.request_parts(ROWS, 3, "disjoint")
    assert [len(p) for p in parts] == [3, 2, 2]  # sizes differ by at most one
    assert [r for p in parts for r in p] == ROWS  # every row once, in order
    assert unlearning.request_parts(ROWS, 1, "disjoint") == [ROWS]
    assert unlearning.request_parts(ROWS, 2, "repeat") == [ROWS, ROWS]
    with pytest.raises(ValueError, match="8 disjoint unlearning requests need at least 8"):
        unlearning.request_parts(ROWS, 8, "disjoint")


def test_one_request_is_the_default_run(net_and_format):
    """requests=1 is the method run once: the default config's weights, bit for bit, whichever
    split is named."""
    config = UnlearnConfig(method="GA+GD", lr=1e-2, steps=4, batch_size=4)
    default, log = _unlearned(net_and_format, SETS, config)
    repeat, _ = _unlearned(
        net_and_format, SETS, config.model_copy(update={"request_split": "repeat"})
    )
    assert _same_weights(default, repeat)
    assert log["steps"] == 4 and [r["rows"] for r in log["requests"]] == [len(ROWS)]
    assert config.label == "GA+GD lr=0.01 steps=4 w=1"


def test_disjoint_requests_unlearn_the_parts_in_order(net_and_format):
    """Two disjoint requests are the method on the first part, then on the second, each from
    the model the previous one left, with the configured steps each."""
    config = UnlearnConfig(method="GA", lr=1e-2, steps=3, batch_size=2)
    split = config.model_copy(update={"requests": 2})
    model, log = _unlearned(net_and_format, SETS, split)
    first, second = unlearning.request_parts(ROWS, 2, "disjoint")
    net, fmt = net_and_format
    expected = copy.deepcopy(net)
    for part in (first, second):
        unlearning.unlearn(expected, fmt, {**SETS, "forget": part}, config, seed=3)
    assert _same_weights(model, expected)
    reversed_order = copy.deepcopy(net)
    for part in (second, first):
        unlearning.unlearn(reversed_order, fmt, {**SETS, "forget": part}, config, seed=3)
    assert not _same_weights(model, reversed_order)  # the order is the one trained
    assert [(r["request"], r["rows"], r["steps"]) for r in log["requests"]] == [
        (1, 4, 3),
        (2, 3, 3),
    ]
    assert log["steps"] == 6 and len(log["losses"]) == 6
    assert split.label == "GA lr=0.01 steps=3 x2 disjoint"


def test_repeated_requests_are_the_method_run_again(net_and_format):
    config = UnlearnConfig(method="GA+GD", lr=1e-2, steps=3, batch_size=4)
    repeated, _ = _unlearned(
        net_and_format, SETS, config.model_copy(update={"requests": 2, "request_split": "repeat"})
    )
    twice, _ = _unlearned(net_and_format, SETS, config, runs=2)
    once, _ = _unlearned(net_and_format, SETS, config)
    assert _same_weights(repeated, twice) and not _same_weights(repeated, once)


def test_early_stop_applies_per_request_on_its_part(net_and_format):
    """A threshold no score is below until it is 1.0: each request stops at its first check,
    which scores that request's own rows."""
    config = UnlearnConfig(
        method="GA", lr=1e-2, steps=20, batch_size=2, requests=2, stop_at_forget_em=1.0,
        check_every=2,
    )  # fmt: skip
    _, log = _unlearned(net_and_format, SETS, config)
    assert [r["steps"] for r in log["requests"]] == [2, 2]
    assert log["stopped_early"] and [c["request"] for c in log["checks"]] == [1, 2]


def _params(*argv: str) -> AuditParams:
    return cli.audit_params(cli.build_parser().parse_args(["audit", "--original", *argv]))


def test_cli_asks_every_method_for_requests():
    params = _params("embedded", "--requests", "3", "--request-split", "repeat")
    assert [(m.requests, m.request_split) for m in params.methods] == [(3, "repeat")] * 3
    params = _params("embedded", "--method", "GA", "--method", "NPO", "--requests", "2")
    assert [(m.requests, m.request_split) for m in params.methods] == [(2, "disjoint")] * 2
    with pytest.raises(ValueError, match="--requests and --request-split would be ignored"):
        _params("embedded", "--unlearned", "x", "--requests", "2")


def test_preflight_refuses_more_disjoint_requests_than_forget_rows(tiny, data_files, tmp_path):
    external = AuditParams(
        embedded=tiny,
        data=DataConfig(forget=data_files["forget"], retain=data_files["retain"]),
        methods=[UnlearnConfig(requests=3), UnlearnConfig(requests=3, request_split="repeat")],
        store=str(tmp_path),
    )
    with pytest.raises(ValueError) as info:
        preflight(external)
    message = str(info.value)
    assert "3 disjoint requests need at least 3 forget rows, the forget set has 2" in message
    assert message.count("disjoint requests need") == 1  # repeat needs no more rows
    embedded = AuditParams(
        embedded=tiny, methods=[UnlearnConfig(requests=100_000)], store=str(tmp_path)
    )
    with pytest.raises(ValueError, match="100000 disjoint requests need at least 100000"):
        preflight(embedded)
    preflight(embedded.model_copy(update={"methods": [UnlearnConfig(requests=2)]}))


def test_lora_requests_train_one_adapter_against_the_original(net_and_format):
    """With LoRA one adapter trains through every request (the stage stores it alone), NPO's
    reference its base, the original; the adapter is merged back afterwards."""
    config = UnlearnConfig(method="NPO", lr=1e-2, steps=2, batch_size=4, lora_rank=4, requests=2)
    model, log = _unlearned(net_and_format, SETS, config)
    net, _ = net_and_format
    assert log["adapter"] is not None and log["steps"] == 4
    assert set(model.state_dict()) == set(net.state_dict())  # merged: no adapter left behind
    assert not _same_weights(model, net)
