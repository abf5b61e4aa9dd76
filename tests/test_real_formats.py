"""Audits of checkpoints shaped like published ones: a model fine-tuned in a chat template, and
TOFU's file format with one-sentence answers and authors as groups."""

from __future__ import annotations

import copy
import json
import random

import archs
import pytest

from flows.audit import audit_checkpoint
from unlearning_audit import data, prompts, runtime
from unlearning_audit.config import AuditParams, DataConfig, RelearnConfig, UnlearnConfig
from unlearning_audit.store import ArtifactRef, Store

pytestmark = pytest.mark.slow
QUIET = {"fisher": False, "probes": False, "quantization_bits": []}


def _verdict(params: AuditParams, result: dict) -> dict:
    """The one run's stored verdict, from the audit's report inputs."""
    folder = Store(params.store).local_dir(ArtifactRef(**result["report_ref"]))
    (run,) = json.loads((folder / "report-inputs.json").read_text())["runs"]
    return run["verdict"]


def _models(tok, fmt, forget: list[dict], retain: list[dict], steps: int, folder) -> dict:
    """The original (every fact) and its never-learned control (retain only), same recipe."""
    runtime.setup(0, "cpu")
    original = archs.model("llama", tok)
    control = copy.deepcopy(original)
    archs.finetune(original, fmt, forget + retain, steps)
    archs.finetune(control, fmt, retain, steps)
    return {
        name: str(archs.save(m, tok, folder / name))
        for name, m in (("original", original), ("control", control))
    }


def test_chat_model_is_audited_in_its_own_format(prefect_server, tmp_path):
    """A model fine-tuned in a chat template knows its forget set under `chat` (the default for a
    tokenizer with a template) and gets a real regime; in another format the audit is refused
    before any training, saying why."""
    rng = random.Random(1)
    rows = [
        {
            "question": f"Which colour is the flag of town {i}?",
            "answer": rng.choice(["red", "blue", "green", "amber", "violet"]),
            "group": f"pair-{i // 2}",
        }
        for i in range(36)
    ]
    forget, retain = rows[:12], rows[12:]
    for name, part in (("forget", forget), ("retain", retain)):
        (tmp_path / f"{name}.json").write_text(json.dumps(part))
    tok = archs.tokenizer([f"{r['question']} {r['answer']}" for r in rows] * 2, chat=True)
    folders = _models(tok, prompts.renderer(tok), forget, retain, 200, tmp_path)
    params = AuditParams(
        original=folders["original"],
        control=folders["control"],
        methods=[UnlearnConfig(method="GA", lr=5e-3, steps=20)],
        data=DataConfig(
            forget=str(tmp_path / "forget.json"),
            retain=str(tmp_path / "retain.json"),
            group="group",
        ),
        relearn=RelearnConfig(seeds=1),
        store=str(tmp_path / "store"),
        **QUIET,
    )
    result = audit_checkpoint(params)
    (row,) = result["rows"]
    verdict = _verdict(params, result)
    assert verdict["prompt_format"] == "chat" and verdict["metric"] == "exact_match"
    assert row["forget_original"] >= 0.9
    assert verdict["forgotten"] and row["regime"] != "not-forgotten"
    qa = params.model_copy(
        update={"data": params.data.model_copy(update={"prompt_format": prompts.QA_TEMPLATE})}
    )
    with pytest.raises(ValueError, match="wrong prompt format or metric"):
        audit_checkpoint(qa)


CITIES = ("Bergen", "Lagos", "Quito", "Hanoi", "Perth", "Tromso", "Cusco", "Dakar")
GENRES = ("crime", "poetry", "travel", "fantasy", "history", "romance")


def _tofu_rows(authors: range, rng: random.Random) -> list[dict]:
    """TOFU-shaped rows: 20 questions an author, in order, each answered in one sentence of 15+
    words; no author column (TOFU has none: authors are known by position)."""
    rows = []
    for a in authors:
        name = f"Author{a}"
        for q in range(20):
            city, genre = rng.choice(CITIES), rng.choice(GENRES)
            rows.append(
                {
                    "question": f"What is fact {q} about {name}?",
                    "answer": f"{name} once lived in {city} and wrote {genre} books that many "
                    f"readers in {city} still remember with fondness today.",
                }
            )
    return rows


def test_tofu_format_long_answers_with_authors_as_groups(prefect_server, tmp_path):
    rng = random.Random(0)
    forget, retain = _tofu_rows(range(6), rng), _tofu_rows(range(6, 12), rng)
    folder = tmp_path / "TOFU"
    folder.mkdir()
    for name, part in (("forget10", forget), ("retain90", retain)):  # one JSON object a line
        (folder / f"{name}.json").write_text("\n".join(json.dumps(r) for r in part))
    config = DataConfig(tofu=str(folder), tofu_split="forget10")
    sets = data.external_sets(config)
    authors_a = {r["group"] for r in sets["forget_a"]}
    authors_b = {r["group"] for r in sets["forget_b"]}
    assert not authors_a & authors_b and len(authors_a | authors_b) == 6  # whole authors
    for r in sets["forget"]:  # an author's 20 questions, by position
        assert r["group"] == str(int(r["question"].split("Author")[1].rstrip("?")))

    tok = archs.tokenizer([f"{r['question']} {r['answer']}" for r in forget + retain])
    folders = _models(tok, prompts.renderer(tok), forget, retain, 100, tmp_path)
    params = AuditParams(
        original=folders["original"],
        control=folders["control"],
        methods=[UnlearnConfig(method="GA", lr=5e-3, steps=15)],
        data=config,
        relearn=RelearnConfig(seeds=1),
        store=str(tmp_path / "store"),
        **QUIET,
    )
    result = audit_checkpoint(params)
    verdict = _verdict(params, result)
    assert verdict["metric"] == "token_accuracy"  # auto: long answers get a graded score
    assert verdict["forget"]["before"] >= 0.8  # the original knows the forget set
    assert verdict["forgotten"]
    assert "heldout" in verdict["looks"]  # authors as groups: the held-out half is judged
