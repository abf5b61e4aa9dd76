"""Training precision (fp32, bf16-mixed, bf16) on a bf16 checkpoint of a tiny Llama; inference
in each checkpoint's own dtype; the setting's validation, and the dtype in stage manifests."""

from __future__ import annotations

import copy
import json
import shutil

import archs
import pytest
import torch
from prefect.logging import disable_run_logger
from pydantic import ValidationError

from tasks.data import prepare_data
from tasks.evaluate import evaluate
from tasks.unlearn import unlearn
from unlearning_audit import checkpoints, prompts, runtime, unlearning
from unlearning_audit.config import AuditParams, DataConfig, EmbeddedConfig, UnlearnConfig
from unlearning_audit.preflight import preflight
from unlearning_audit.report import precision_line
from unlearning_audit.store import ArtifactRef, Store


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Facts (a town's flag colour) and the same tiny random Llama saved in bf16 and fp32."""
    rows = archs.flag_facts(32)
    root = tmp_path_factory.mktemp("precision")
    for name, part in (("forget", rows[:16]), ("retain", rows[16:])):
        (root / f"{name}.json").write_text(json.dumps(part))
    runtime.setup(0, "cpu")
    tok = archs.tokenizer([prompts.QA_TEMPLATE.format(**r) for r in rows])
    net = archs.model("llama", tok)
    archs.save(net, tok, root / "fp32")
    archs.save(net.to(torch.bfloat16), tok, root / "bf16")
    return root, {"forget": rows[:16], "retain": rows[16:]}


def test_mixed_precision_keeps_the_updates_that_pure_bf16_rounds_away(folders):
    """10 GA steps at lr 1e-5 on a bf16 checkpoint: bf16-mixed changes as many weights as fp32
    (within 10%), pure bf16 far fewer; every run ends in the checkpoint's dtype."""
    root, sets = folders
    model, tok = checkpoints.load(root / "bf16", "cpu")
    assert model.dtype == torch.bfloat16  # loaded in its own dtype
    before = [p.detach().clone() for p in model.parameters()]
    share = {}
    for precision in ("fp32", "bf16-mixed", "bf16"):
        trained = copy.deepcopy(model)
        config = UnlearnConfig(method="GA", lr=1e-5, steps=10)
        log = unlearning.unlearn(
            trained, prompts.renderer(tok), sets, config, seed=0, precision=precision
        )
        assert log["precision"] == precision
        params = list(trained.parameters())
        assert all(p.dtype == torch.bfloat16 for p in params)
        changed = sum(int((p != b).sum()) for p, b in zip(params, before, strict=True))
        share[precision] = changed / sum(p.numel() for p in params)
    print("share of weights changed:", share)
    assert abs(share["bf16-mixed"] - share["fp32"]) <= 0.1 * share["fp32"]
    assert share["bf16"] < 0.5 * share["fp32"]


def _stage(task, *args, **kwargs) -> ArtifactRef:
    """A stage task run as a plain function; its artifact (a cache hit is a Completed state)."""
    with disable_run_logger():
        out = task.fn(*args, **kwargs)
    return out if isinstance(out, ArtifactRef) else out.data


def _copy(folder):
    """A store build that copies ``folder``'s files."""
    return lambda out: shutil.copytree(folder, out, dirs_exist_ok=True) and None


def test_stages_run_in_the_checkpoints_dtype_and_record_it(folders, tmp_path, monkeypatch):
    """Evaluation runs a bf16 checkpoint in bf16 and an fp32 one in fp32; unlearning stores a
    bf16 checkpoint in bf16; each manifest records the dtype (and the training precision);
    the resolved precision keys the training stage (auto on a CPU is fp32)."""
    monkeypatch.setattr("tasks._progress.create_progress_artifact", lambda *a, **k: None)
    root, _ = folders
    url = str(tmp_path / "store")
    store = Store(url)
    config = DataConfig(forget=str(root / "forget.json"), retain=str(root / "retain.json"))
    data_ref = _stage(prepare_data, url, config, EmbeddedConfig())
    ckpt = {
        dtype: store.cached("checkpoint", {"dtype": dtype}, {}, "v", _copy(root / dtype))[0]
        for dtype in ("bf16", "fp32")
    }
    for dtype, name in (("bf16", "torch.bfloat16"), ("fp32", "torch.float32")):
        ref = _stage(evaluate, url, ckpt[dtype], data_ref, max_rows=4, device="cpu")
        assert store.manifest(ref.key)["meta"]["dtype"] == name
        assert store.read_json(ref, "evaluation.json")["dtype"] == name

    method = UnlearnConfig(method="GA", lr=1e-5, steps=2, batch_size=4)
    args = (url, ckpt["bf16"], data_ref, method)
    mixed = _stage(unlearn, *args, device="cpu", precision="bf16-mixed")
    meta = store.manifest(mixed.key)["meta"]
    assert {k: meta[k] for k in ("precision", "dtype")} == {
        "precision": "bf16-mixed",
        "dtype": "torch.bfloat16",
    }
    assert meta["config"]["precision"] == "bf16-mixed"
    model, _ = checkpoints.load(store.local_dir(mixed), "cpu")
    assert model.dtype == torch.bfloat16
    fp32 = _stage(unlearn, *args, device="cpu", precision="fp32")
    assert fp32.key != mixed.key
    assert _stage(unlearn, *args, device="cpu", precision="auto").key == fp32.key


def test_precision_is_resolved_and_checked_against_the_device(tmp_path, monkeypatch):
    """auto is fp32 on a CPU; bf16 runs on a CPU (torch 2 autocasts it); bf16 asked for on a
    device without it is a preflight problem; an unknown precision is refused."""
    cpu = torch.device("cpu")
    assert runtime.supports_bf16(cpu)
    assert runtime.resolve_precision("auto", "cpu") == "fp32"
    assert runtime.resolve_precision("bf16", "cpu") == "bf16"
    store = str(tmp_path / "store")
    preflight(AuditParams(precision="bf16-mixed", device="cpu", store=store))
    monkeypatch.setattr(runtime, "supports_bf16", lambda device: False)
    with pytest.raises(ValueError, match="precision: 'bf16' was asked for, but cpu does not"):
        preflight(AuditParams(precision="bf16", device="cpu", store=store))
    preflight(AuditParams(precision="auto", device="cpu", store=store))
    with pytest.raises(ValidationError, match="precision"):
        AuditParams(precision="fp16")


def test_the_report_states_the_precision():
    line = precision_line({"training": ["bf16-mixed"], "dtypes": ["torch.bfloat16"]})
    assert line == (
        "precision: unlearning and relearning in bf16-mixed (fp32 master weights and optimizer "
        "state, bf16 autocast); checkpoints in bfloat16, each evaluated in its own dtype"
    )
    assert precision_line(None) == "precision: not recorded"
