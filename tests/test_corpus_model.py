"""The embedded default: corpus, tokenizer and tiny model."""

from __future__ import annotations

import pytest

from unlearning_audit import corpus, data, embedded, prompts
from unlearning_audit.config import DataConfig, EmbeddedConfig
from unlearning_audit.evaluation import evaluate


def test_corpus_is_deterministic_and_complete():
    groups = {"text": 30, "code": 10, "math": 10}
    facts = corpus.generate(7, groups)
    assert facts == corpus.generate(7, groups)
    assert facts != corpus.generate(8, groups)
    assert len(facts) == 5 * sum(groups.values())
    for domain, n in groups.items():
        assert len({f.group for f in facts if f.domain == domain}) == n
    math = [f for f in facts if f.domain == "math"]
    assert all(f.question.endswith(" =") and 100 <= int(f.answer) < 1000 for f in math)


def test_no_answer_follows_from_its_question_or_its_group():
    """Math results are drawn, not computed: neither the sum nor a group's other answers give
    them away (the held-out half would otherwise test nothing)."""
    facts = corpus.generate(0, {"math": 200})
    sums = [sum(int(x) for x in f.question.rstrip(" =").split(" # ")) for f in facts]
    assert sum(int(f.answer) == s for f, s in zip(facts, sums, strict=True)) <= 2
    by_group: dict[str, set[str]] = {}
    for f in facts:
        by_group.setdefault(f.group, set()).add(f.answer)
    assert sum(len(answers) for answers in by_group.values()) >= 0.95 * len(facts)


def test_control_trains_every_token_of_the_forget_rows():
    """The never-learned control is not handicapped: every token of every forget row (all
    domains) occurs in the rows it pretrains on, the directory rows included, which carry no
    forget fact."""
    config = EmbeddedConfig(authors=60, functions=12, operands=12, forget_fraction=0.2)
    facts, forget = corpus.embedded(config)
    tok = embedded.train_tokenizer(facts, 600)
    names = corpus.directory(facts)
    forget_rows = [f for f in facts if f.group in forget]
    control_rows = [f for f in facts if f.group not in forget] + names

    def tokens(rows) -> set[int]:
        rows = [{"question": f.question, "answer": f.answer} for f in rows]
        batch = data.train_batch(prompts.renderer(tok), rows)
        return set(batch["input_ids"][batch["attention_mask"].bool()].tolist())

    assert tokens(forget_rows) <= tokens(control_rows)
    facts_asked = {(f.question, f.answer) for f in facts}
    assert not {(n.question, n.answer) for n in names} & facts_asked
    assert {n.answer for n in names} >= {f.group for f in forget_rows}


def test_embeddings_and_head_are_separate_matrices(tiny):
    tok = embedded.train_tokenizer(corpus.generate(0, {"text": 5}), 300)
    model = embedded.build_model(tok, tiny)
    head, embeddings = model.get_output_embeddings().weight, model.get_input_embeddings().weight
    assert head.data_ptr() != embeddings.data_ptr()


def test_forget_groups_are_a_seeded_share_of_one_domain():
    facts = corpus.generate(0, {"text": 100, "code": 20})
    forget = corpus.forget_groups(facts, "text", 0.1, seed=0)
    assert len(forget) == 10
    assert forget == corpus.forget_groups(facts, "text", 0.1, seed=0)
    assert set(forget) <= {f.group for f in facts if f.domain == "text"}
    sets = data.embedded_sets(facts, set(forget), "text")
    assert len(sets["forget"]) == 50 and len(sets["retain"]) == 450
    assert {r["domain"] for r in sets["unrelated"]} == {"code"}
    halves = {r["group"] for r in sets["forget_a"]}, {r["group"] for r in sets["forget_b"]}
    assert not halves[0] & halves[1] and halves[0] | halves[1] == set(forget)


def test_unknown_domain_is_an_error():
    with pytest.raises(ValueError, match="unknown domain"):
        corpus.generate(0, {"poetry": 3})


def test_tokenizer_round_trips_and_masks_prompts(tiny):
    facts = corpus.generate(0, {"text": 5})
    tok = embedded.train_tokenizer(facts, 300)
    row = {"question": facts[0].question, "answer": facts[0].answer}
    batch = data.train_batch(prompts.renderer(tok), [row, {"question": "Q?", "answer": "x"}])
    ids, labels, mask = batch["input_ids"][0], batch["labels"][0], batch["attention_mask"][0]
    answer_ids = [i for i, y in zip(ids.tolist(), labels.tolist(), strict=True) if y != -100]
    assert tok.decode(answer_ids[:-1]).strip() == row["answer"]
    assert answer_ids[-1] == tok.eos_token_id
    assert tok.decode(ids[mask.bool()][1:], skip_special_tokens=True).startswith("Q: ")
    short = batch["labels"][1]
    assert (short[batch["attention_mask"][1] == 0] == -100).all()  # pads carry no loss


def test_batches_hold_each_row_encoded_alone():
    """One tokenizer call per batch gives every row the ids of its whole text (prompt and
    answer) encoded by itself, placed right- or left-aligned with the mask over exactly those
    ids; the answer's labels are its own tokens and EOS."""
    facts = corpus.generate(1, {"text": 4, "math": 2})
    tok = embedded.train_tokenizer(facts, 300)
    rows = [{"question": f.question, "answer": f.answer} for f in facts]

    def alone(text: str) -> list[int]:
        return tok(text, add_special_tokens=False)["input_ids"]

    fmt = prompts.renderer(tok)
    whole = [[tok.bos_token_id, *alone(f"Q: {r['question']}\nA: {r['answer']}")] for r in rows]
    split = [fmt.encode([r])[0] for r in rows]
    starts = [e.prompt for e in split]
    answers = [[*e.answer, tok.eos_token_id] for e in split]
    assert [p + a[:-1] for p, a in zip(starts, answers, strict=True)] == whole
    assert [tok.decode(e.answer).strip() for e in split] == [r["answer"] for r in rows]
    train = data.train_batch(fmt, rows)
    for left in (False, True):
        batch = data.prompt_batch(fmt, rows, left=left)
        for i, ids in enumerate(starts):
            mask = batch["attention_mask"][i].bool()
            assert batch["input_ids"][i][mask].tolist() == ids
            assert mask.sum() == len(ids) and (mask[-1] if left else mask[0])
    for i, (p, a) in enumerate(zip(starts, answers, strict=True)):
        mask = train["attention_mask"][i].bool()
        assert train["input_ids"][i][mask].tolist() == p + a
        assert train["labels"][i][mask].tolist() == [-100] * len(p) + a


def test_tiny_model_learns_the_forget_set(tiny, tiny_model):
    model, tok, facts, forget = tiny_model
    target = [{"question": f.question, "answer": f.answer} for f in facts if f.group in forget]
    fmt = prompts.renderer(tok)
    scores = evaluate(model, fmt, target)
    assert scores["exact_match"] >= tiny.target_exact_match
    assert scores["token_accuracy"] >= tiny.target_token_accuracy
    untrained = embedded.build_model(tok, tiny)
    assert evaluate(untrained, fmt, target)["exact_match"] < 0.1


def test_pretraining_that_cannot_reach_the_targets_fails(tiny):
    facts = corpus.generate(0, {"text": 10})
    rows = [{"question": f.question, "answer": f.answer} for f in facts]
    tok = embedded.train_tokenizer(facts, 300)
    config = tiny.model_copy(update={"max_steps": 2, "eval_every": 1})
    with pytest.raises(RuntimeError, match="did not reach exact match"):
        embedded.pretrain(embedded.build_model(tok, config), tok, rows, rows, config)


def test_row_ids_pair_facts_and_null_ids_are_replaced(tmp_path):
    """Every row gets an id that names it in every set (the halves keep the forget set's), and a
    null id is dropped, never read as the string "None" shared by every row."""
    import json

    path = tmp_path / "forget.jsonl"
    rows = [
        {"id": None, "question": f"Q{i}", "answer": "A", "group": f"g{i % 2}"} for i in range(4)
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    loaded = data.load_rows(str(path), group="group")
    assert all("id" not in r for r in loaded)
    sets = data.with_halves(data.with_ids({"forget": loaded, "retain": [], "unrelated": []}))
    ids = [r["id"] for r in sets["forget"]]
    assert len(set(ids)) == 4 and "None" not in ids
    assert {r["id"] for r in sets["forget_a"] + sets["forget_b"]} == set(ids)


def test_tofu_preset_maps_splits_to_files_or_hub_configs_and_groups_by_author():
    local = DataConfig(tofu="/data/TOFU", tofu_split="forget05")
    assert (local.forget, local.retain) == ("/data/TOFU/forget05.json", "/data/TOFU/retain95.json")
    hub = DataConfig(tofu="locuslab/TOFU@abc123", tofu_split="forget01")
    assert hub.forget == "locuslab/TOFU:forget01@abc123#train"
    assert hub.retain == "locuslab/TOFU:retain99@abc123#train"
    assert hub.group == "position:20" and hub.has_groups
    assert DataConfig.model_validate(hub.model_dump()) == hub  # a Prefect parameter round trip
    with pytest.raises(ValueError, match="either tofu or"):
        DataConfig(tofu="/data/TOFU", forget="mine.json")


def test_groups_by_column_or_position_and_none_without(tmp_path):
    """Rows group by a named column or by position (TOFU: 20 questions an author, in order);
    without groups the halves are empty, never split by question."""
    import json

    path = tmp_path / "facts.json"  # one object a line, as TOFU writes its .json files
    rows = [{"question": f"Q{i}", "answer": "A", "author": f"au{i // 3}"} for i in range(12)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    by_column = data.load_rows(str(path), group="author")
    by_position = data.load_rows(str(path), group="position:3")
    assert [r["group"] for r in by_column] == [f"au{i // 3}" for i in range(12)]
    assert [r["group"] for r in by_position] == [str(i // 3) for i in range(12)]
    halves = data.with_halves(data.with_ids({"forget": by_position}))
    assert not {r["group"] for r in halves["forget_a"]} & {r["group"] for r in halves["forget_b"]}
    ungrouped = data.with_halves(data.with_ids({"forget": data.load_rows(str(path))}))
    assert ungrouped["forget_a"] == ungrouped["forget_b"] == []
    with pytest.raises(ValueError, match="no column"):
        data.load_rows(str(path), group="publisher")
    with pytest.raises(ValueError, match="position:N"):
        data.load_rows(str(path), group="position:0")
