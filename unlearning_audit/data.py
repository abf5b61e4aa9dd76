"""Question/answer probe sets: loading, splitting, validating and batching for causal LMs.

A row is a dict with ``question`` and ``answer`` (plus ``group`` and ``attribute`` where known)
and an ``id`` that names the fact in every set it is in (a half of the forget set keeps its ids),
so per-fact scores of two models pair up.
Every stage renders a row the same way, in the audit's prompt format (prompts.py), and computes
loss only on the answer and its end: labels are -100 on the prompt and on padding.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from .config import DataConfig
from .corpus import Fact
from .prompts import Encoded, Renderer

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
        name: [{**r, "id": r.get("id") or f"{name}-{i}"} for i, r in enumerate(rows)]
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


def load_rows(
    source: str, question: str = "question", answer: str = "answer", group: str | None = None
) -> list[dict]:
    """Rows from a local JSON (a list, or one object a line as TOFU's files are), JSONL or
    Parquet file, or a ``datasets`` source ``name[:config][@revision][#split]`` (split
    defaults to train).

    ``group`` names the column that groups rows (an author, a topic), or ``position:N``: every
    N consecutive rows are one group, as TOFU orders its 20 questions per author.
    """
    path = Path(source).expanduser()
    if path.suffix in {".json", ".jsonl", ".parquet"}:
        if not path.is_file():
            raise ValueError(f"data file {source!r} does not exist")
        records = _read_file(path)
    else:
        records = _load_dataset(source)
    per_group = _position_groups(group)
    columns = {question, answer} | ({group} if group and not per_group else set())
    missing = columns - set(records[0] if records else {})
    if records and missing:
        raise ValueError(f"data source {source!r} has no column(s) {sorted(missing)}")
    rows = [
        {
            "question": str(r[question]),
            "answer": str(r[answer]),
            **{k: str(r[k]) for k in ("id", "attribute") if r.get(k) not in (None, "")},
        }
        for r in records
    ]
    if group is None:
        return rows
    if not per_group and (empty := sum(r.get(group) in (None, "") for r in records)):
        raise ValueError(f"data source {source!r}: {empty} row(s) have no {group!r} (group)")
    return [
        {**row, "group": str(i // per_group) if per_group else str(r[group])}
        for i, (row, r) in enumerate(zip(rows, records, strict=True))
    ]


def _position_groups(group: str | None) -> int | None:
    """N of a ``position:N`` group spec, else None."""
    if group is None or not group.startswith("position:"):
        return None
    size = group.removeprefix("position:")
    if not size.isdigit() or int(size) < 1:
        raise ValueError(f"group {group!r}: position:N needs a whole number N >= 1")
    return int(size)


def _read_file(path: Path) -> list[dict]:
    """The records of a local JSON, JSON-lines or Parquet file."""
    if path.suffix == ".parquet":
        return pq.read_table(path).to_pylist()
    text = path.read_text()
    if path.suffix == ".json":
        try:
            records = json.loads(text)
            return records if isinstance(records, list) else [records]
        except json.JSONDecodeError:
            pass  # one object a line, as TOFU writes its .json files
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _load_dataset(source: str) -> list[dict]:
    import datasets

    spec, _, split = source.partition("#")
    spec, _, revision = spec.partition("@")
    name, _, config = spec.partition(":")
    ds = datasets.load_dataset(
        name, config or None, split=split or "train", revision=revision or None
    )
    return ds.to_list()


def external_sets(config: DataConfig) -> dict[str, list[dict]]:
    """Forget/retain/unrelated sets from the user's sources (unrelated may be absent)."""

    def load(source: str) -> list[dict]:
        return load_rows(source, config.question_column, config.answer_column, config.group)

    sets = {"forget": load(config.forget), "retain": load(config.retain)}
    sets["unrelated"] = load(config.unrelated) if config.unrelated else []
    return with_halves(with_ids(sets))


def check_sets(sets: dict[str, list[dict]]) -> None:
    """Raise one ValueError listing every problem with the forget and retain sets."""
    problems = []
    if not sets["forget"]:
        problems.append("the forget set is empty")
    if not sets["retain"]:
        problems.append("the retain set is empty")
    for name in ("forget", "retain", "unrelated"):
        counts = Counter(r["id"] for r in sets.get(name, []))
        if dupes := sorted(i for i, k in counts.items() if k > 1)[:3]:
            problems.append(f"the {name} set has duplicate row ids, e.g. {dupes}")
    overlap = {r["question"] for r in sets["forget"]} & {r["question"] for r in sets["retain"]}
    if overlap:
        example = sorted(overlap)[:3]
        problems.append(
            f"{len(overlap)} question(s) are in both forget and retain sets, e.g. {example}"
        )
    if problems:
        raise ValueError("invalid data: " + "; ".join(problems))


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
