"""Data sources: identified by the rows they hold, every row validated, every bad file a clear
error that names the file and the line (or item, or row), never a traceback or a hang."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from prefect.logging import disable_run_logger

from tasks.data import prepare_data
from unlearning_audit import cli, data
from unlearning_audit.config import DataConfig, EmbeddedConfig
from unlearning_audit.store import ArtifactRef, Store

FORGET = [{"question": f"Who wrote book {i}?", "answer": f"Author {i}"} for i in range(4)]
RETAIN = [{"question": f"Where is town {i}?", "answer": f"Region {i}"} for i in range(3)]


# -- writing sources in every form --------------------------------------------------------


def _jsonl(path: Path, rows: list) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _json(path: Path, rows: list) -> str:
    path.write_text(json.dumps(rows, indent=1))
    return str(path)


def _csv(path: Path, rows: list[dict]) -> str:
    import csv

    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list({k: 0 for r in rows for k in r}))
        writer.writeheader()
        writer.writerows(rows)
    return str(path)


def _parquet(path: Path, rows: list[dict]) -> str:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


def _folder(path: Path, rows: list) -> str:
    """A folder that `datasets` reads with its local JSON loader (split train)."""
    path.mkdir(exist_ok=True)
    (path / "train.json").write_text(json.dumps(rows))
    return str(path)


WRITERS = {
    "jsonl": (_jsonl, ".jsonl"),
    "json": (_json, ".json"),
    "csv": (_csv, ".csv"),
    "parquet": (_parquet, ".parquet"),
    "datasets-folder": (_folder, ""),
}


def _write(kind: str, folder: Path, name: str, rows: list) -> str:
    writer, suffix = WRITERS[kind]
    return writer(folder / f"{name}{suffix}", rows)


def _prepare(store: str, config: DataConfig) -> ArtifactRef:
    """The data stage's artifact, run as a plain function (no Prefect run needed)."""
    with disable_run_logger():
        out = prepare_data.fn(store, config, EmbeddedConfig())
    return out if isinstance(out, ArtifactRef) else out.data  # a cache hit is a Completed state


def _refused(source: str, **kwargs) -> str:
    with pytest.raises(ValueError) as caught:
        data.load_rows(source, **kwargs)
    return str(caught.value)


# -- identity by content ------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(WRITERS))
def test_edited_data_is_new_data_and_the_same_rows_the_same_key(kind, tmp_path):
    """An edit of the same size, with the old modification time put back, is still new data (a
    new key, and the stage serves the new rows); the old content again is the old key."""
    forget = _write(kind, tmp_path, "forget", FORGET)
    retain = _write(kind, tmp_path, "retain", RETAIN)
    config, store = DataConfig(forget=forget, retain=retain), str(tmp_path / "store")
    first = _prepare(store, config)
    assert _prepare(store, config).key == first.key  # unchanged: served from the store

    edited = [*FORGET[:-1], {**FORGET[-1], "answer": "Author X"}]  # same length
    target = Path(forget) / "train.json" if kind == "datasets-folder" else Path(forget)
    stamp = target.stat()
    _write(kind, tmp_path, "forget", edited)
    os.utime(target, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    second = _prepare(store, config)
    assert second.key != first.key
    served = data.read_sets(Store(store).local_dir(second))
    assert served["forget"][-1]["answer"] == "Author X"
    assert [r["question"] for r in served["retain"]] == [r["question"] for r in RETAIN]

    _write(kind, tmp_path, "forget", FORGET)
    assert _prepare(store, config).key == first.key


def test_the_same_rows_from_any_form_are_the_same_data(tmp_path):
    identities = set()
    for kind in WRITERS:
        folder = tmp_path / kind
        folder.mkdir()
        config = DataConfig(
            forget=_write(kind, folder, "forget", FORGET),
            retain=_write(kind, folder, "retain", RETAIN),
        )
        identities.add(data.identity(data.external_sets(config)))
    assert len(identities) == 1
    sets = data.external_sets(config)
    sets["retain"][0] = {**sets["retain"][0], "answer": "Region 0 "}  # one space more
    assert data.identity(sets) not in identities


def test_bad_data_is_refused_before_the_store_is_asked(tmp_path):
    forget = _jsonl(tmp_path / "forget.jsonl", [*FORGET, {"question": "Q?", "answer": None}])
    config = DataConfig(forget=forget, retain=_jsonl(tmp_path / "retain.jsonl", RETAIN))
    with pytest.raises(ValueError, match=rf"{forget}:5: 'answer' is null, not text"):
        _prepare(str(tmp_path / "store"), config)
    store = tmp_path / "store"
    assert not store.exists() or list(Store(str(store)).manifests()) == []


# -- rows validated by type ---------------------------------------------------------------

NOT_TEXT = [
    (None, "is null, not text"),
    (3, "is a number (3), not text"),
    (2.5, "is a number (2.5), not text"),
    (True, "is a boolean (true), not text"),
    (["a", "b"], 'is a list (["a", "b"]), not text'),
    ({"text": "a"}, 'is an object ({"text": "a"}), not text'),
    ("", "is empty"),
    (" \n\t", "is empty"),
    ("\ud800", "is not valid Unicode (it holds an unpaired surrogate)"),
]


@pytest.mark.parametrize("column", ["question", "answer"])
@pytest.mark.parametrize(("value", "message"), NOT_TEXT, ids=[m for _, m in NOT_TEXT])
def test_question_and_answer_must_be_text(tmp_path, column, value, message):
    rows = [*FORGET[:2], {**FORGET[2], column: value}]
    lines = _refused(_jsonl(tmp_path / "f.jsonl", rows))
    assert lines == f"{tmp_path / 'f.jsonl'}:3: {column!r} {message}"
    items = _refused(_json(tmp_path / "f.json", rows))
    assert items == f"{tmp_path / 'f.json'}: item 2: {column!r} {message}"


BAD_LABELS = [
    (True, "is a boolean (true), not a string or an integer"),
    (1.5, "is a number (1.5), not a string or an integer"),
    ([1], "is a list ([1]), not a string or an integer"),
    ({"a": 1}, 'is an object ({"a": 1}), not a string or an integer'),
    ("", "is empty"),
    ("  ", "is empty"),
]


@pytest.mark.parametrize(("value", "message"), BAD_LABELS, ids=[m for _, m in BAD_LABELS])
@pytest.mark.parametrize("column", ["id", "group", "attribute"])
def test_ids_groups_and_attributes_are_strings_or_integers(tmp_path, column, value, message):
    rows = [{**r, "id": f"f{i}", "group": "g", "attribute": "a"} for i, r in enumerate(FORGET)]
    rows[1][column] = value
    path = _jsonl(tmp_path / "f.jsonl", rows)
    if column == "attribute" and not str(value).strip():
        assert "attribute" not in data.load_rows(path, group="group")[1]  # none given
        return
    if column == "group" and not str(value).strip():
        message = "no 'group' value (the group column)"
    else:
        message = f"{column!r} {message}"
    assert _refused(path, group="group") == f"{path}:2: {message}"


def test_integer_labels_are_kept_as_strings_and_null_ids_replaced(tmp_path):
    rows = [{**r, "id": i + 10, "group": i // 2, "attribute": 7} for i, r in enumerate(FORGET)]
    rows[0]["id"] = None
    loaded = data.load_rows(_jsonl(tmp_path / "f.jsonl", rows), group="group")
    assert [r.get("id") for r in loaded] == [None, "11", "12", "13"]
    assert [r["group"] for r in loaded] == ["0", "0", "1", "1"]
    assert {r["attribute"] for r in loaded} == {"7"}
    config = DataConfig(forget=str(tmp_path / "f.jsonl"), retain=_json(tmp_path / "r.json", RETAIN))
    assert [r["id"] for r in data.external_sets(config)["forget"]] == ["forget-0", "11", "12", "13"]


def test_ids_repeated_in_a_set_are_named_with_their_places(tmp_path):
    rows = [{**r, "id": 5 if i < 3 else "5"} for i, r in enumerate(FORGET)]  # 5 and "5" clash
    path = _jsonl(tmp_path / "f.jsonl", rows)
    assert (
        _refused(path)
        == f"{path}: duplicate row ids, e.g. ['5'] ('5': line 1, line 2, line 3, ... of {path})"
    )
    config = DataConfig(forget=path, retain=_json(tmp_path / "r.json", RETAIN))
    with pytest.raises(ValueError, match=r"the forget set has duplicate row ids, e.g. \['5'\]"):
        data.external_sets(config)


def test_every_problem_is_listed_up_to_a_limit(tmp_path):
    rows = [{"question": f"Q{i}?", "answer": None} for i in range(data.SHOWN + 7)]
    path = _jsonl(tmp_path / "f.jsonl", rows)
    lines = _refused(path).splitlines()
    assert lines[0] == "invalid data:"
    assert lines[1] == f"    - {path}:1: 'answer' is null, not text"
    assert lines[data.SHOWN] == f"    - {path}:{data.SHOWN}: 'answer' is null, not text"
    assert lines[-1] == f"    - ... and 7 more problem(s) in {path}"


@pytest.mark.parametrize("kind", ["jsonl", "json", "csv", "parquet", "datasets-folder"])
def test_a_column_missing_in_a_later_row_or_in_all_rows(kind, tmp_path):
    rows = [*FORGET[:3], {"question": "Q?", "answer": "A", "extra": 1}, {"question": "Q2?"}]
    if kind in ("csv", "parquet", "datasets-folder"):  # a table: a missing value is empty/null
        message = "'answer' is empty" if kind == "csv" else "'answer' is null, not text"
    else:
        message = "no 'answer'"
    source = _write(kind, tmp_path, "f", rows)
    place = {"jsonl": ":5", "csv": ":6", "json": ": item 4"}.get(kind, ": row 4")
    assert _refused(source) == f"{source}{place}: {message}"
    source = _write(kind, tmp_path, "g", [{"prompt": "Q?", "answer": "A"}])
    assert (
        _refused(source)
        == f"{source}: no column 'question' in any row (columns: ['answer', 'prompt'])"
    )


# -- bad files ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            json.dumps({"question": "Q?", "answer": "A"}),
            "holds one JSON object, not a list of rows",
        ),
        (
            json.dumps({"data": FORGET}, indent=2),
            "holds one JSON object, not a list of rows (its key 'data' holds a list: are the rows "
            "there?); give a JSON list of row objects, or one row object a line",
        ),
        ("42", "holds a number (42), not a list of row objects"),
        ('"rows"', 'holds a string ("rows"), not a list of row objects'),
        ("null", "holds null, not a list of row objects"),
        (
            '[\n {"question": "Q?",\n  "answer": "A"},,\n]',
            ":3: not valid JSON (Expecting value at column 18)",
        ),
        ("[" * 100_000, "not valid JSON (nested too deeply)"),
        ("  \n\n ", "the file is empty"),
        ("", "the file is empty"),
    ],
    ids=[
        "one-row-object",
        "wrapped",
        "number",
        "string",
        "null",
        "syntax",
        "deep",
        "blank",
        "empty",
    ],
)
def test_a_json_file_that_is_not_a_list_of_rows(tmp_path, text, message):
    path = tmp_path / "f.json"
    path.write_text(text)
    assert _refused(str(path)).startswith(f"{path}{'' if message[0] == ':' else ': '}{message}")


def test_tofu_json_files_hold_one_object_a_line(tmp_path):
    path = tmp_path / "forget10.json"
    path.write_text("\n".join(json.dumps(r) for r in FORGET) + "\n\n")
    assert data.load_rows(str(path)) == FORGET
    path.write_text("\n".join([json.dumps(FORGET[0]), "{oops", "3", json.dumps(FORGET[1])]))
    assert _refused(str(path)) == (
        f"invalid data:\n    - {path}:2: not valid JSON (Expecting property name enclosed in "
        f"double quotes at column 2)\n    - {path}:3: a number (3), not an object with "
        "'question' and 'answer'"
    )


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("3", "a number (3), not an object with 'question' and 'answer'"),
        ('"Q?"', 'a string ("Q?"), not an object with'),
        ('["Q?", "A"]', 'a list (["Q?", "A"]), not an object with'),
        ("null", "null, not an object with"),
        ('{"question": "Q?", "answer": "A"', "not valid JSON (Expecting ',' delimiter"),
        (
            '{"question": "Q?", "answer": "A", "answer": null}',
            "not valid JSON (key(s) ['answer'] given twice",
        ),
        ("NaN", "a number (NaN), not an object"),
        ("[" * 50_000, "not valid JSON (nested too deeply)"),
    ],
)
def test_a_json_line_that_is_not_a_row_object(tmp_path, line, message):
    path = tmp_path / "f.jsonl"
    path.write_text(json.dumps(FORGET[0]) + "\n\n" + line + "\n" + json.dumps(FORGET[1]) + "\n")
    assert _refused(str(path)).startswith(f"{path}:3: {message}")


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".csv"])
@pytest.mark.parametrize("encoding", ["latin-1", "utf-16", "cp1252"])
def test_a_file_not_in_utf8_is_named(tmp_path, suffix, encoding):
    path = tmp_path / f"f{suffix}"
    rows = [*FORGET, {"question": "Qui a écrit « Zoé » ?", "answer": "Renée"}]
    text = (
        "question,answer\n" + "".join(f"{r['question']},{r['answer']}\n" for r in rows)
        if suffix == ".csv"
        else "\n".join(json.dumps(r, ensure_ascii=False) for r in rows)
    )
    path.write_bytes(text.encode(encoding))
    message = _refused(str(path))
    assert message.startswith(str(path)) and "not UTF-8" in message and "UTF-8" in message
    if encoding != "utf-16":
        line = 6 if suffix == ".csv" else 5
        assert message.startswith(f"{path}:{line}: not UTF-8 text")


def test_utf8_with_a_byte_order_mark_is_read(tmp_path):
    for suffix, text in [
        (".json", json.dumps(FORGET)),
        (".jsonl", "\n".join(json.dumps(r) for r in FORGET)),
        (".csv", "question,answer\n" + "".join(f"{r['question']},{r['answer']}\n" for r in FORGET)),
    ]:
        path = tmp_path / f"f{suffix}"
        path.write_bytes(text.encode("utf-8-sig"))
        assert data.load_rows(str(path)) == FORGET


def test_csv_and_tsv_are_read_and_validated(tmp_path):
    rows = [{**r, "id": f"f{i}", "author": f"a{i // 2}"} for i, r in enumerate(FORGET)]
    path = _csv(tmp_path / "f.csv", rows)
    loaded = data.load_rows(path, group="author")
    assert [r["group"] for r in loaded] == ["a0", "a0", "a1", "a1"]
    assert [r["id"] for r in loaded] == ["f0", "f1", "f2", "f3"]
    tsv = tmp_path / "f.tsv"
    tsv.write_text("question\tanswer\nQ1?\tA, with a comma\n")
    assert data.load_rows(str(tsv)) == [{"question": "Q1?", "answer": "A, with a comma"}]
    bad = tmp_path / "bad.csv"
    bad.write_text('question,answer,id\nQ1?,A1,\n"Q2\nspans lines?",,x\nQ3?\nQ4?,A4,x,extra\n')
    assert _refused(str(bad)) == (
        f"invalid data:\n    - {bad}:3: 'answer' is empty\n"
        f"    - {bad}:5: 1 field(s), the header has 3\n"
        f"    - {bad}:6: 4 field(s), the header has 3"
    )
    twice = tmp_path / "twice.csv"
    twice.write_text("question,answer,answer\nQ,A,B\n")
    assert _refused(str(twice)) == f"{twice}:1: the header names column(s) ['answer'] twice"


def test_a_parquet_file_with_bad_values_or_bad_bytes(tmp_path):
    table = pa.table({"question": ["Q1?", "Q2?", None], "answer": [1, 2, 3]})
    path = tmp_path / "f.parquet"
    pq.write_table(table, path)
    message = _refused(str(path))
    assert message.splitlines()[1:] == [
        f"    - {path}: row 0: 'answer' is a number (1), not text",
        f"    - {path}: row 1: 'answer' is a number (2), not text",
        f"    - {path}: row 2: 'question' is null, not text",
        f"    - {path}: row 2: 'answer' is a number (3), not text",
    ]
    path.write_bytes(b"PAR1 this is not parquet PAR1")
    assert _refused(str(path)).startswith(f"{path}: not a readable Parquet file (")


def test_not_a_regular_file_is_refused_without_reading_it(tmp_path):
    fifo = tmp_path / "forget.json"
    os.mkfifo(fifo)
    result: list = []
    reader = threading.Thread(target=lambda: result.append(_refused(str(fifo))), daemon=True)
    reader.start()
    reader.join(10)
    if reader.is_alive():  # unblock the reader so the test process can end
        with open(fifo, "w"):
            pass
        pytest.fail("reading a FIFO hung")
    assert result == [f"{fifo}: a FIFO (named pipe), not a regular file"]
    folder = tmp_path / "rows.jsonl"
    folder.mkdir()
    assert _refused(str(folder)) == f"{folder}: a folder, not a .jsonl file"
    link = tmp_path / "link.json"
    link.symlink_to(fifo)
    assert _refused(str(link)) == f"{link}: a FIFO (named pipe), not a regular file"
    assert _refused("/dev/null.json") == "data file '/dev/null.json' does not exist"


@pytest.mark.parametrize("name", ["rows.txt", "rows", "rows.json.gz", "rows.xlsx"])
def test_an_unsupported_local_file_lists_the_formats(tmp_path, name):
    path = tmp_path / name
    path.write_text(json.dumps(FORGET))
    assert _refused(str(path)) == f"{path}: not a supported data file; give {data.SUPPORTED}"


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".csv", ".tsv", ".parquet"])
def test_an_empty_file_is_named(tmp_path, suffix):
    path = tmp_path / f"f{suffix}"
    path.write_bytes(b"")
    assert _refused(str(path)) == f"{path}: the file is empty"


def test_a_folder_through_datasets_is_validated_the_same(tmp_path):
    folder = tmp_path / "rows"
    _folder(folder, [*FORGET, {"question": "Q?", "answer": 7}])
    assert _refused(str(folder)).startswith(f"{folder}: row 4: 'answer' is")
    (folder / "train.json").write_text("[{oops")
    assert _refused(str(folder)).startswith(f"data source {str(folder)!r} could not be loaded: ")
    missing = tmp_path / "no-such-folder"
    assert _refused(str(missing)).startswith(f"data source {str(missing)!r} could not be loaded: ")


@pytest.mark.parametrize(
    "error", [ConnectionError, FileNotFoundError, ValueError, RuntimeError, KeyError, OSError]
)
def test_an_unreachable_datasets_source_is_named_without_credentials(monkeypatch, error):
    import datasets

    token, password = "hf_abcdefghijklmnopqrstuvwxyz0123", "s3cr3t-pass-word"
    monkeypatch.setenv("HF_TOKEN", token)
    monkeypatch.setenv("MY_SERVICE_PASSWORD", password)

    def refuse(*args, **kwargs):
        try:
            raise OSError(f"401 Unauthorized, Authorization: Bearer {token}")
        except OSError as cause:
            raise error(
                f"Couldn't reach https://user:{password}@hub.example/org/set?token={token}\n"
                "second line"
            ) from cause

    monkeypatch.setattr(datasets, "load_dataset", refuse)
    message = _refused("someorg/someset:cfg@abc123#test")
    assert message.startswith(
        f"data source 'someorg/someset:cfg@abc123#test' could not be loaded: {error.__name__}: "
    )
    assert "caused by OSError: 401 Unauthorized" in message
    assert token not in message and password not in message and "hf_abc" not in message
    assert "second line" not in message and "\n" not in message


# -- all problems at once, through preflight and the command line -------------------------


def test_every_problem_of_every_source_and_set_is_one_error(tmp_path):
    forget = _jsonl(
        tmp_path / "forget.jsonl",
        [{**FORGET[0], "id": "x"}, {**FORGET[1], "id": "x"}, {"question": "Q?", "answer": None}],
    )
    retain = tmp_path / "retain.json"
    retain.write_text(json.dumps({"rows": RETAIN}))
    config = DataConfig(
        forget=forget, retain=str(retain), unrelated=_jsonl(tmp_path / "u.jsonl", [RETAIN[0]])
    )
    with pytest.raises(ValueError) as caught:
        data.external_sets(config)
    assert str(caught.value).splitlines() == [
        "invalid data:",
        f"    - {forget}:3: 'answer' is null, not text",
        f"    - {retain}: holds one JSON object, not a list of rows (its key 'rows' holds a list: "
        "are the rows there?); give a JSON list of row objects, or one row object a line (JSON "
        "lines, .jsonl)",
    ]
    forget = _jsonl(tmp_path / "forget.jsonl", [{**FORGET[0], "id": "x"}, {**FORGET[1], "id": "x"}])
    config = config.model_copy(update={"retain": _jsonl(tmp_path / "retain.jsonl", [FORGET[1]])})
    with pytest.raises(ValueError) as caught:
        data.external_sets(config)
    assert str(caught.value).splitlines() == [
        "invalid data:",
        f"    - the forget set has duplicate row ids, e.g. ['x'] ('x': line 1, line 2 of {forget})",
        f"    - 1 question(s) are in both forget and retain sets, e.g. ['{FORGET[1]['question']}']",
    ]


def test_the_command_line_names_the_file_and_line(capsys, tmp_path):
    forget = _jsonl(tmp_path / "forget.jsonl", [*FORGET, {"question": "Q?", "answer": None}])
    retain = _json(tmp_path / "retain.json", RETAIN)
    store = tmp_path / "store"
    argv = ["audit", "--original", "embedded", "--store", str(store)]
    code = cli.main([*argv, "--forget", forget, "--retain", retain])
    err = capsys.readouterr().err
    assert code == 2
    assert f"error: invalid audit:\n  - data: {forget}:5: 'answer' is null, not text\n" in err
    csv_file = tmp_path / "retain.csv"
    csv_file.write_text("question,answer\nQ1?,\n")
    code = cli.main([*argv, "--forget", forget, "--retain", str(csv_file)])
    err = capsys.readouterr().err
    assert code == 2
    assert (
        f"  - data: invalid data:\n    - {forget}:5: 'answer' is null, not text\n"
        f"    - {csv_file}:2: 'answer' is empty\n"
    ) in err
    assert not store.exists() or list(Store(str(store)).manifests()) == []


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("", "the data source '' is empty; give "),
        ("  ", "the data source '  ' is empty; give "),
        ("rows\x00.json", "data source 'rows\\x00.json' is not a usable path (it holds a NUL"),
        ("x" * 5000 + ".json", "is not a usable path ([Errno 36] File name too long"),
    ],
    ids=["empty", "blank", "nul", "too-long"],
)
def test_a_source_that_is_no_usable_name(source, message):
    assert message in _refused(source)


def test_a_set_without_a_column_beside_a_good_one(tmp_path):
    """A source that lacks a column in every row is one problem, and the other sets' checks
    still run (no KeyError from rows without a question)."""
    forget = _jsonl(tmp_path / "f.jsonl", [{"prompt": r["question"]} for r in FORGET])
    retain = _jsonl(tmp_path / "r.jsonl", [RETAIN[0], RETAIN[0]])
    config = DataConfig(forget=forget, retain=retain)
    with pytest.raises(ValueError) as caught:
        data.external_sets(config)
    assert str(caught.value).splitlines() == [
        "invalid data:",
        f"    - {forget}: no column 'answer' in any row (columns: ['prompt'])",
        f"    - {forget}: no column 'question' in any row (columns: ['prompt'])",
    ]
