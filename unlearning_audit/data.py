"""Question/answer probe sets: loading, splitting, validating and batching for causal LMs.

A row is a dict with ``question`` and ``answer`` (plus ``group`` and ``attribute`` where known)
and an ``id`` that names the fact in every set it is in (a half of the forget set keeps its ids),
so per-fact scores of two models pair up.
Every stage renders a row the same way, in the audit's prompt format (prompts.py), and computes
loss only on the answer and its end: labels are -100 on the prompt and on padding.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import os
import random
import stat
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from . import scratch
from .config import DataConfig
from .corpus import Fact
from .prompts import Encoded, Renderer
from .store import digest, file_kind, redact

SETS = ("forget", "retain", "unrelated", "forget_a", "forget_b")
FORMAT = "format.json"
"""The data artifact's prompt format: prompt_format, separator, max_new_tokens (DataConfig)."""
IGNORE = -100


# -- building the sets ------------------------------------------------------------------------


def embedded_sets(facts: Sequence[Fact], forget: set[str], domain: str) -> dict[str, list[dict]]:
    """Forget, retain and unrelated sets of one domain of the embedded corpus (forget = groups)."""
    rows = [
        {
            "question": f.question,
            "answer": f.answer,
            "group": f.group,
            "attribute": f.attribute,
            "domain": f.domain,
        }
        for f in facts
    ]
    sets = {
        "forget": [r for r in rows if r["domain"] == domain and r["group"] in forget],
        "retain": [r for r in rows if r["domain"] == domain and r["group"] not in forget],
        "unrelated": [r for r in rows if r["domain"] != domain and r["group"] not in forget],
    }
    return with_halves(with_ids(sets))


def with_ids(sets: dict[str, list[dict]]) -> dict[str, list[dict]]:
    """Give every row without an ``id`` one: its set's name and its position there."""
    return {
        name: [
            {**r, "id": r["id"] if r.get("id") not in (None, "") else f"{name}-{i}"}
            for i, r in enumerate(rows)
        ]
        for name, rows in sets.items()
    }


def with_halves(sets: dict[str, list[dict]], seed: int = 0) -> dict[str, list[dict]]:
    """Add ``forget_a`` / ``forget_b``: halves of the forget set that share no group, so the
    held-out half holds out whole groups (an author's every fact). Without groups both are
    empty: halves split by question would put one author's facts on both sides."""
    if not all(r.get("group") for r in sets["forget"]):
        return {**sets, "forget_a": [], "forget_b": []}
    groups = sorted({r["group"] for r in sets["forget"]})
    random.Random(seed).shuffle(groups)
    half_a = set(groups[: len(groups) // 2])
    forget_a = [r for r in sets["forget"] if r["group"] in half_a]
    forget_b = [r for r in sets["forget"] if r["group"] not in half_a]
    return {**sets, "forget_a": forget_a, "forget_b": forget_b}


FORMATS = (".json", ".jsonl", ".csv", ".tsv", ".parquet")
"""Local data files read directly; any other source is a folder or a ``datasets`` name."""
SUPPORTED = (
    "a .json file (a list of objects, or one object a line), .jsonl, .csv, .tsv or .parquet, "
    "a folder of data files, or a `datasets` name[:config][@revision][#split]"
)
SHOWN = 20
"""At most this many problems are listed per source, then how many more there are."""


@dataclass
class _Loaded:
    """A source's valid rows, where each came from, and every problem found in it."""

    rows: list[dict] = field(default_factory=list)
    where: list[tuple[str, str]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def load_rows(
    source: str, question: str = "question", answer: str = "answer", group: str | None = None
) -> list[dict]:
    """Rows from a local JSON (a list, or one object a line as TOFU's files are), JSONL, CSV,
    TSV or Parquet file, a local folder of data files, or a ``datasets`` source
    ``name[:config][@revision][#split]`` (split defaults to train).

    ``group`` names the column that groups rows (an author, a topic), or ``position:N``: every
    N consecutive rows are one group, as TOFU orders its 20 questions per author.

    Every row is validated: question and answer are non-empty text; an ``id`` (null: none) is a
    non-empty string or an integer, unique in the source; group and attribute values are
    strings or integers. Raises one ValueError naming every problem (up to SHOWN) with its
    place: ``file:line`` (JSON lines, CSV), ``file: item i`` (a JSON list, from 0) or
    ``source: row i`` (Parquet, ``datasets``, from 0).
    """
    loaded = _load(source, question, answer, group)
    problems = _capped(loaded.problems, source)
    if not loaded.problems and (dupes := _duplicates(loaded.rows, loaded.where)):
        problems.append(f"{source}: duplicate row ids, e.g. {dupes}")
    if problems:
        raise ValueError(_message(problems))
    return loaded.rows


def _load(source: str, question: str, answer: str, group: str | None) -> _Loaded:
    """A source's rows, validated; rows with a problem are left out and the problem kept."""
    per_group = _position_groups(group)
    out = _Loaded()
    records, out.problems = _records(source)
    columns = [question, answer] + ([group] if group and not per_group else [])
    objects = [r for _, r in records if isinstance(r, dict)]
    seen = sorted({str(k) for r in objects for k in r})
    absent = {c for c in columns if objects and not any(c in r for r in objects)}
    for column in sorted(absent):
        listed = seen[:12] + (["..."] if len(seen) > 12 else [])
        out.problems.append(f"{source}: no column {column!r} in any row (columns: {listed})")
    for i, (part, record) in enumerate(records):
        row, problems = _row(record, question, answer, group, absent)
        if per_group and row is not None:
            row["group"] = str(i // per_group)
        out.problems += [f"{_at(source, part)}: {p}" for p in problems]
        if row is not None and not problems and not absent:
            out.rows.append(row)
            out.where.append((source, part))
    return out


def _row(
    record, question: str, answer: str, group: str | None, absent: set[str]
) -> tuple[dict | None, list[str]]:
    """One record as a row (question, answer; id, attribute, group where given) and its
    problems; columns in ``absent`` (in no row at all) are reported once, not per row."""
    if isinstance(record, _Unparsed):
        return None, [record.problem]
    if not isinstance(record, dict):
        return None, [f"{_describe(record)}, not an object with {question!r} and {answer!r}"]
    row, problems = {}, []
    for key, column in (("question", question), ("answer", answer)):
        if column in absent:
            continue
        if column not in record:
            problems.append(f"no {column!r}")
            continue
        value, problem = _text(record[column], column)
        row[key] = value
        problems += [problem] if problem else []
    for key in ("id", "attribute"):
        value = record.get(key)
        if value is None or (key == "attribute" and isinstance(value, str) and not value.strip()):
            continue  # a null id is none: the row gets its position's (with_ids)
        row[key], problem = _label(value, key)
        problems += [problem] if problem else []
    if group is not None and not group.startswith("position:") and group not in absent:
        value = record.get(group)
        if value is None or (isinstance(value, str) and not value.strip()):
            problems.append(f"no {group!r} value (the group column)")
        else:
            row["group"], problem = _label(value, group)
            problems += [problem] if problem else []
    return row, problems


def _text(value, column: str) -> tuple[str, str | None]:
    """A question or answer: non-empty text (valid Unicode); else a problem."""
    if not isinstance(value, str):
        return "", f"{column!r} is {_describe(value)}, not text"
    if not value.strip():
        return "", f"{column!r} is empty"
    if not _valid_unicode(value):
        return "", f"{column!r} is not valid Unicode (it holds an unpaired surrogate)"
    return value, None


def _label(value, column: str) -> tuple[str, str | None]:
    """An id, group or attribute: a non-empty string or an integer, as a string."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value), None
    if not isinstance(value, str):
        return "", f"{column!r} is {_describe(value)}, not a string or an integer"
    return _text(value, column)  # a string: the same checks as a question's


def _valid_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _describe(value) -> str:
    """What a JSON-like value is, with a short rendering of it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        kind = "a boolean"
    elif isinstance(value, int | float):
        kind = "a number"
    elif isinstance(value, str):
        kind = "a string"
    elif isinstance(value, list | tuple):
        kind = "a list"
    elif isinstance(value, dict):
        kind = "an object"
    else:
        kind = f"a {type(value).__name__}"
    shown = json.dumps(value, default=repr, ensure_ascii=False)
    return f"{kind} ({shown[:40] + '...' if len(shown) > 40 else shown})"


def _at(source: str, part: str) -> str:
    """``file:3`` for a line, ``source: item 3`` / ``source: row 3`` otherwise."""
    if part.startswith("line "):
        return f"{source}:{part.removeprefix('line ')}"
    return f"{source}: {part}"


def _duplicates(rows: Sequence[dict], where: Sequence[tuple[str, str]] | None) -> str | None:
    """``['a'] ('a': line 1, line 4 of f.json)``: the first repeated ids, and where; or None."""
    places: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        if r.get("id") is not None:
            places.setdefault(r["id"], []).append(i)
    dupes = sorted(k for k, v in places.items() if len(v) > 1)
    if not dupes:
        return None
    text = f"{dupes[:3]}"
    if where:
        shown = []
        for d in dupes[:3]:
            at = [where[i] for i in places[d]]
            parts = ", ".join(p for _, p in at[:3]) + (", ..." if len(at) > 3 else "")
            shown.append(f"{d!r}: {parts} of {at[0][0]}")
        text += f" ({'; '.join(shown)})"
    if len(dupes) > 3:
        text += f", {len(dupes)} repeated ids in all"
    return text


def _capped(problems: list[str], source: str) -> list[str]:
    """The first SHOWN problems of a source, then how many more there are."""
    if len(problems) <= SHOWN:
        return problems
    return [*problems[:SHOWN], f"... and {len(problems) - SHOWN} more problem(s) in {source}"]


def _message(problems: list[str]) -> str:
    """One problem as it is; several as an indented list (nested under preflight's list)."""
    if len(problems) == 1:
        return problems[0]
    return "invalid data:" + "".join(f"\n    - {p}" for p in problems)


def _position_groups(group: str | None) -> int | None:
    """N of a ``position:N`` group spec, else None."""
    if group is None or not group.startswith("position:"):
        return None
    size = group.removeprefix("position:")
    if not size.isdigit() or int(size) < 1:
        raise ValueError(f"group {group!r}: position:N needs a whole number N >= 1")
    return int(size)


# -- reading sources --------------------------------------------------------------------------

Records = list[tuple[str, object]]
"""A source's records, each with its place (``line 3``, ``item 3``, ``row 3``)."""


def _records(source: str) -> tuple[Records, list[str]]:
    """The records of a local file, a local folder or a ``datasets`` name, and the problems
    that kept any from being read."""
    if not source.strip():  # Path("") is the working folder, which must not be read as data
        return [], [f"the data source {source!r} is empty; give {SUPPORTED}"]
    if "\x00" in source:
        return [], [f"data source {source!r} is not a usable path (it holds a NUL character)"]
    path = Path(source).expanduser()
    suffix = path.suffix.lower()
    try:
        folder, exists = path.is_dir(), path.exists() or path.is_symlink()
    except (OSError, ValueError) as exc:  # a name too long, a NUL character
        return [], [f"data source {source!r} is not a usable path ({exc})"]
    if folder:
        if suffix in FORMATS:
            return [], [f"{source}: a folder, not a {suffix} file"]
        return _dataset_records(source)
    if suffix in FORMATS:
        return _file_records(source, path, suffix)
    if exists:
        return [], [f"{source}: not a supported data file; give {SUPPORTED}"]
    return _dataset_records(source)


def _file_records(source: str, path: Path, suffix: str) -> tuple[Records, list[str]]:
    """Records of a local file, opened without blocking (a FIFO must not hang the audit) and
    read only if it is a regular file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        return [], [f"data file {source!r} does not exist"]
    except OSError as exc:
        return [], [f"{source}: cannot be read ({exc.strerror or exc})"]
    with os.fdopen(fd, "rb") as f:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            return [], [f"{source}: {file_kind(mode)}, not a regular file"]
        os.set_blocking(fd, True)
        head = f.read(4)
        f.seek(0)
        if not head:
            return [], [f"{source}: the file is empty"]
        if suffix != ".parquet" and head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
            return [], [f"{source}: UTF-16 text, not UTF-8; save it as UTF-8"]
        try:
            if suffix == ".parquet":
                return _parquet_records(source, f)
            if suffix in (".csv", ".tsv"):
                return _csv_records(source, f, "\t" if suffix == ".tsv" else ",")
            if suffix == ".json":
                return _json_records(source, f)
            return _json_line_records(source, f)
        except OSError as exc:
            return [], [f"{source}: cannot be read ({exc.strerror or exc})"]


class _DuplicateKey(ValueError):
    pass


@dataclass
class _Unparsed:
    """A record that could not be read (a line that is not JSON, say): its problem, kept in
    place so that every problem of a file is listed in the file's order."""

    problem: str


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """A JSON object's pairs as a dict; a key given twice (which value counts?) is refused."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        twice = sorted(k for k in obj if sum(p[0] == k for p in pairs) > 1)
        raise _DuplicateKey(f"key(s) {twice} given twice in one object")
    return obj


def _parse_json(text: str):
    return json.loads(text, object_pairs_hook=_unique_keys)


def _json_error(exc: Exception) -> str:
    if isinstance(exc, json.JSONDecodeError):
        return f"{exc.msg} at column {exc.colno}"
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    return str(exc)


def _not_utf8(source: str, f) -> str:
    """The first line of a binary file that is not UTF-8, as a problem."""
    f.seek(0)
    for n, raw in enumerate(f, 1):
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            return (
                f"{source}:{n}: not UTF-8 text (byte {exc.start + 1} of the line); save it as UTF-8"
            )
    return f"{source}: not UTF-8 text; save it as UTF-8"


def _json_line_records(source: str, f) -> tuple[Records, list[str]]:
    """One JSON object a line, read a line at a time; blank lines are skipped."""
    records, problems, blank = [], [], True
    for n, raw in enumerate(f, 1):
        if n == 1:
            raw = raw.removeprefix(codecs.BOM_UTF8)
        if not raw.strip():
            continue
        blank = False
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            bad = f"not UTF-8 text (byte {exc.start + 1} of the line); save it as UTF-8"
            records.append((f"line {n}", _Unparsed(bad)))
            return records, problems  # the whole file's encoding is wrong, not one line
        try:
            records.append((f"line {n}", _parse_json(line)))
        except (ValueError, RecursionError) as exc:
            records.append((f"line {n}", _Unparsed(f"not valid JSON ({_json_error(exc)})")))
    if blank:
        problems.append(f"{source}: the file is empty (blank lines only)")
    return records, problems


def _json_records(source: str, f) -> tuple[Records, list[str]]:
    """A JSON list of objects, or (as TOFU writes its .json files) one object a line."""
    stream = io.TextIOWrapper(f, encoding="utf-8-sig")
    try:
        text = stream.read()
    except UnicodeDecodeError:
        return [], [_not_utf8(source, stream.detach())]
    stream.detach()  # leave f open for a second reading
    try:
        doc = _parse_json(text)
    except (ValueError, RecursionError) as exc:
        first = next((line for line in io.StringIO(text) if line.strip()), None)
        if first is None:
            return [], [f"{source}: the file is empty (blank lines only)"]
        if _is_object(first):  # one object a line
            del text
            f.seek(0)
            return _json_line_records(source, f)
        at = f"{source}:{exc.lineno}" if isinstance(exc, json.JSONDecodeError) else source
        return [], [f"{at}: not valid JSON ({_json_error(exc)})"]
    if isinstance(doc, list):
        return [(f"item {i}", r) for i, r in enumerate(doc)], []
    if isinstance(doc, dict):
        lists = [k for k, v in doc.items() if isinstance(v, list)]
        hint = f" (its key {lists[0]!r} holds a list: are the rows there?)" if lists else ""
        return [], [
            f"{source}: holds one JSON object, not a list of rows{hint}; give a JSON list of "
            "row objects, or one row object a line (JSON lines, .jsonl)"
        ]
    return [], [f"{source}: holds {_describe(doc)}, not a list of row objects"]


def _is_object(line: str) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except (ValueError, RecursionError):
        return False


def _csv_records(source: str, f, delimiter: str) -> tuple[Records, list[str]]:
    """Rows of a CSV (or TSV) file with a header line; every value is text, and an empty
    ``id`` or ``attribute`` cell is none."""
    stream = io.TextIOWrapper(f, encoding="utf-8-sig", newline="")  # read as it is parsed
    reader = csv.reader(stream, delimiter=delimiter)
    records, problems, header, line = [], [], None, 0
    try:
        for fields in reader:
            start, line = line + 1, reader.line_num
            if not fields:
                continue  # a blank line
            if header is None:
                header = fields
                twice = sorted({h for h in header if header.count(h) > 1})
                if twice:
                    return [], [f"{source}:{start}: the header names column(s) {twice} twice"]
                continue
            if len(fields) != len(header):
                bad = f"{len(fields)} field(s), the header has {len(header)}"
                records.append((f"line {start}", _Unparsed(bad)))
                continue
            record = dict(zip(header, fields, strict=True))
            for key in ("id", "attribute"):
                if record.get(key) == "":
                    del record[key]
            records.append((f"line {start}", record))
    except csv.Error as exc:
        problems.append(f"{source}:{reader.line_num}: not valid CSV ({exc})")
    except UnicodeDecodeError:
        return [], [_not_utf8(source, stream.detach())]
    if header is None:
        problems.append(f"{source}: the file is empty (no header line)")
    return records, problems


def _parquet_records(source: str, f) -> tuple[Records, list[str]]:
    """Rows of a Parquet file, a record batch at a time."""
    records: Records = []
    try:
        for batch in pq.ParquetFile(f).iter_batches():
            records += [(f"row {len(records) + i}", r) for i, r in enumerate(batch.to_pylist())]
    except (pa.ArrowException, ValueError, TypeError, OSError) as exc:
        return [], [f"{source}: not a readable Parquet file ({_first_line(str(exc))})"]
    return records, []


def _dataset_records(source: str) -> tuple[Records, list[str]]:
    """Rows of a ``datasets`` source: a local folder (read with a fresh cache, so an edited file
    is never served from an old one) or ``name[:config][@revision][#split]``."""
    import datasets

    if Path(source).expanduser().exists():
        name, config, revision, split = str(Path(source).expanduser()), "", "", ""
    else:
        spec, _, split = source.partition("#")
        spec, _, revision = spec.partition("@")
        name, _, config = spec.partition(":")
        if name.startswith("~"):
            name = str(Path(name).expanduser())
    quiet = datasets.are_progress_bars_disabled()
    try:
        local = Path(name).exists()
        cache = scratch.folder("datasets") if local else nullcontext()
        if local:  # a few local rows: no progress bars (a download keeps its own)
            datasets.disable_progress_bars()
        with cache as folder:
            ds = datasets.load_dataset(
                name,
                config or None,
                split=split or "train",
                revision=revision or None,
                cache_dir=folder,
            )
            rows = ds.to_list()
            del ds
    except Exception as exc:  # datasets raises many kinds (network, hub, files, schema)
        return [], [f"data source {redact(source)!r} could not be loaded: {_reason(exc)}"]
    finally:
        if not quiet:
            datasets.enable_progress_bars()
    return [(f"row {i}", r) for i, r in enumerate(rows)], []


def _first_line(text: str) -> str:
    line = next((s.strip() for s in text.splitlines() if s.strip()), "")
    return line[:300] + "..." if len(line) > 300 else line


def _reason(exc: BaseException) -> str:
    """An exception and its root cause, one line each, credentials masked (store.redact)."""
    root, seen = exc, {id(exc)}
    while (nxt := root.__cause__ or root.__context__) is not None and id(nxt) not in seen:
        root = nxt
        seen.add(id(root))
    text = f"{type(exc).__name__}: {_first_line(str(exc))}"
    if root is not exc and str(root) != str(exc):
        text += f" (caused by {type(root).__name__}: {_first_line(str(root))})"
    return redact(text)


# -- the sets ---------------------------------------------------------------------------------


def external_sets(config: DataConfig) -> dict[str, list[dict]]:
    """Forget/retain/unrelated sets from the user's sources (unrelated may be absent).

    Raises one ValueError listing every problem of every source (each row's, with its place)
    and of the sets (empty, repeated ids, questions in both forget and retain).
    """
    sources = {"forget": config.forget, "retain": config.retain, "unrelated": config.unrelated}
    sets, where, problems, failed = {}, {}, [], set()
    for name, source in sources.items():
        if source is None:
            sets[name], where[name] = [], []
            if name != "unrelated":
                problems.append(f"no {name} source (data.{name})")
                failed.add(name)
            continue
        loaded = _load(source, config.question_column, config.answer_column, config.group)
        sets[name], where[name] = loaded.rows, loaded.where
        problems += _capped(loaded.problems, source)
        if loaded.problems:
            failed.add(name)
    if config.unrelated and "unrelated" not in failed and not sets["unrelated"]:
        problems.append(f"the unrelated set is empty ({config.unrelated})")
    sets = with_ids(sets)
    problems += set_problems(sets, where, skip=failed)
    if problems:
        raise ValueError(_message(problems))
    return with_halves(sets)


def set_problems(
    sets: dict[str, list[dict]],
    where: dict[str, list[tuple[str, str]]] | None = None,
    skip: set[str] | frozenset[str] = frozenset(),
) -> list[str]:
    """What is wrong with the forget and retain sets (and repeated ids in any set); ``where``
    places each row (as external_sets reads them), ``skip`` names sets that failed to load."""
    problems = [
        f"the {name} set is empty"
        for name in ("forget", "retain")
        if name not in skip and not sets.get(name)
    ]
    for name in ("forget", "retain", "unrelated"):
        rows = sets.get(name, [])
        if name not in skip and (dupes := _duplicates(rows, (where or {}).get(name))):
            problems.append(f"the {name} set has duplicate row ids, e.g. {dupes}")
    overlap = {r["question"] for r in sets.get("forget", [])} & {
        r["question"] for r in sets.get("retain", [])
    }
    if overlap and not {"forget", "retain"} & set(skip):
        example = sorted(overlap)[:3]
        problems.append(
            f"{len(overlap)} question(s) are in both forget and retain sets, e.g. {example}"
        )
    return problems


def check_sets(sets: dict[str, list[dict]]) -> None:
    """Raise one ValueError listing every problem with the forget and retain sets."""
    if problems := set_problems(sets):
        raise ValueError(_message(problems))


def identity(sets: dict[str, Sequence[dict]]) -> str:
    """sha256 of the sets' rows (every set, row and field, in order): the data artifact's
    identity, so the same rows from any source (file, folder, ``datasets`` name, pinned or not)
    are the same data, and an edit anywhere is new data."""
    return digest({name: list(rows) for name, rows in sets.items()})


def chance(rows: Sequence[dict], reference: Sequence[dict]) -> list[float] | None:
    """Per row, the exact match a well-formed guess that knows no fact can expect: always
    answering the attribute's most common value in ``reference`` is right on that value's share
    of the attribute's rows (no guess that ignores the question does better). None when rows
    carry no attribute, so chance cannot be measured."""
    if not rows or not all(r.get("attribute") for r in rows):
        return None
    counts: dict[str, dict[str, int]] = {}
    for r in reference:
        values = counts.setdefault(r.get("attribute") or "", {})
        values[r["answer"]] = values.get(r["answer"], 0) + 1
    best = {a: max(v.values()) / sum(v.values()) for a, v in counts.items()}
    return [best.get(r["attribute"], 0.0) for r in rows]


def sample(rows: list[dict], n: int, seed: int = 0) -> list[dict]:
    """At most ``n`` rows, a seeded sample in the original order."""
    if len(rows) <= n:
        return list(rows)
    keep = sorted(random.Random(seed).sample(range(len(rows)), n))
    return [rows[i] for i in keep]


def write_sets(sets: dict[str, list[dict]], folder: Path) -> None:
    """One Parquet file per set."""
    for name, rows in sets.items():
        columns = ("id", "question", "answer", "group", "attribute", "domain")
        table = pa.table(
            {c: [r.get(c, "") for r in rows] for c in columns},
            schema=pa.schema([(c, pa.string()) for c in columns]),
        )
        pq.write_table(table, folder / f"{name}.parquet")


def read_sets(folder: Path) -> dict[str, list[dict]]:
    """The sets written by :func:`write_sets`."""
    return {name: pq.read_table(folder / f"{name}.parquet").to_pylist() for name in SETS}


# -- tokenising and batching ------------------------------------------------------------------


def train_batch(fmt: Renderer, rows: Sequence[dict]) -> dict[str, torch.Tensor]:
    """Right-padded prompt+answer+end ids, attention mask, labels on the answer and its end
    only, and ``answer``: the answer's own positions (its end excluded)."""
    encoded = fmt.encode(rows)
    seqs = [e.prompt + e.answer + e.end for e in encoded]
    labels = [[IGNORE] * len(e.prompt) + e.answer + e.end for e in encoded]
    answer = [[0] * len(e.prompt) + [1] * len(e.answer) for e in encoded]
    return _right_pad(seqs, labels, answer, fmt.pad_id)


def prompt_batch(
    fmt: Renderer, rows: Sequence[dict], left: bool = False
) -> dict[str, torch.Tensor]:
    """Prompt ids only; left-padded for generation, right-padded for activations."""
    return pad_prompts(fmt.encode(rows), fmt.pad_id, left)


def pad_prompts(
    encoded: Sequence[Encoded], pad: int, left: bool = False
) -> dict[str, torch.Tensor]:
    """The prompts of already-encoded rows as one padded batch (see :func:`prompt_batch`)."""
    seqs = [e.prompt for e in encoded]
    width = max(map(len, seqs))
    ids = np.full((len(seqs), width), pad, dtype=np.int64)
    mask = np.zeros((len(seqs), width), dtype=np.int64)
    for i, s in enumerate(seqs):
        where = slice(width - len(s), width) if left else slice(0, len(s))
        ids[i, where], mask[i, where] = s, 1
    return {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)}


def _right_pad(
    seqs: list[list[int]], labels: list[list[int]], answer: list[list[int]], pad: int
) -> dict[str, torch.Tensor]:
    width = max(map(len, seqs))
    ids = np.full((len(seqs), width), pad, dtype=np.int64)
    lab = np.full((len(seqs), width), IGNORE, dtype=np.int64)
    mask = np.zeros((len(seqs), width), dtype=np.int64)
    where = np.zeros((len(seqs), width), dtype=bool)
    for i, (s, y, a) in enumerate(zip(seqs, labels, answer, strict=True)):
        ids[i, : len(s)], lab[i, : len(y)], mask[i, : len(s)], where[i, : len(a)] = s, y, 1, a
    return {
        "input_ids": torch.from_numpy(ids),
        "attention_mask": torch.from_numpy(mask),
        "labels": torch.from_numpy(lab),
        "answer": torch.from_numpy(where),
    }


def chunks(rows: Sequence[dict], size: int) -> Iterator[Sequence[dict]]:
    """Consecutive slices of at most ``size`` rows."""
    for start in range(0, len(rows), size):
        yield rows[start : start + size]


def shuffled_batches(rows: Sequence[dict], size: int, seed: int) -> Iterator[list[dict]]:
    """An endless stream of row batches, reshuffled each epoch from a seeded generator."""
    if not rows:
        raise ValueError("cannot draw batches from an empty set")
    rng = random.Random(seed)
    order: list[int] = []
    while True:
        if len(order) < size:
            epoch = list(range(len(rows)))
            rng.shuffle(epoch)
            order += epoch
        batch, order = order[:size], order[size:]
        yield [rows[i] for i in batch]
