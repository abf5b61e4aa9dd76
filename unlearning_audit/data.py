"""Question/answer probe sets: loading, splitting, validating and batching for causal LMs.

A row is a dict with ``question`` and ``answer`` (plus ``group`` and ``attribute`` where known)
and an ``id`` that names the fact in every set it is in (a half of the forget set keeps its ids),
so per-fact scores of two models pair up.
Every stage formats a row the same way, ``"Q: {question}\\nA:"`` then ``" {answer}"`` and EOS, and
computes loss only on the answer tokens: labels are -100 on the prompt and on padding.
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

SETS = ("forget", "retain", "unrelated", "forget_a", "forget_b")
IGNORE = -100


def prompt_text(question: str) -> str:
    """The prompt a model sees for a question."""
    return f"Q: {question}\nA:"


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
    """Add ``forget_a`` / ``forget_b``: disjoint halves of the forget set, split by group."""
    groups = sorted({r.get("group", r["question"]) for r in sets["forget"]})
    random.Random(seed).shuffle(groups)
    half_a = set(groups[: len(groups) // 2])
    forget_a = [r for r in sets["forget"] if r.get("group", r["question"]) in half_a]
    forget_b = [r for r in sets["forget"] if r.get("group", r["question"]) not in half_a]
    return {**sets, "forget_a": forget_a, "forget_b": forget_b}


def load_rows(source: str, question: str = "question", answer: str = "answer") -> list[dict]:
    """Rows from a local JSON/JSONL/Parquet file or a ``datasets`` source.

    A ``datasets`` source is ``name[:config][@revision][#split]`` (split defaults to train).
    """
    path = Path(source).expanduser()
    if path.suffix in {".json", ".jsonl", ".parquet"}:
        if not path.is_file():
            raise ValueError(f"data file {source!r} does not exist")
        if path.suffix == ".parquet":
            records = pq.read_table(path).to_pylist()
        elif path.suffix == ".jsonl":
            records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        else:
            records = json.loads(path.read_text())
    else:
        records = _load_dataset(source)
    missing = {question, answer} - set(records[0] if records else {})
    if records and missing:
        raise ValueError(f"data source {source!r} has no column(s) {sorted(missing)}")
    return [
        {
            "question": str(r[question]),
            "answer": str(r[answer]),
            **{k: str(r[k]) for k in ("id", "group", "attribute") if r.get(k) not in (None, "")},
        }
        for r in records
    ]


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
    load = lambda src: load_rows(src, config.question_column, config.answer_column)  # noqa: E731
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


def _prompt_ids(tokenizer, rows: Sequence[dict]) -> list[list[int]]:
    """BOS (if any) + prompt ids of each row, the batch encoded in one tokenizer call."""
    encoded = tokenizer([prompt_text(r["question"]) for r in rows], add_special_tokens=False)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return [bos + ids for ids in encoded["input_ids"]]


def _answer_ids(tokenizer, rows: Sequence[dict]) -> list[list[int]]:
    """Answer ids + EOS of each row, the batch encoded in one tokenizer call."""
    encoded = tokenizer([f" {r['answer']}" for r in rows], add_special_tokens=False)
    return [[*ids, tokenizer.eos_token_id] for ids in encoded["input_ids"]]


def pad_id(tokenizer) -> int:
    """The padding id (EOS where the tokenizer has no pad token; pads are masked anyway)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def train_batch(tokenizer, rows: Sequence[dict]) -> dict[str, torch.Tensor]:
    """Right-padded prompt+answer ids, attention mask, and labels on answer tokens only."""
    prompts, answers = _prompt_ids(tokenizer, rows), _answer_ids(tokenizer, rows)
    seqs = [p + a for p, a in zip(prompts, answers, strict=True)]
    labels = [[IGNORE] * len(p) + a for p, a in zip(prompts, answers, strict=True)]
    return _right_pad(seqs, labels, pad_id(tokenizer))


def prompt_batch(tokenizer, rows: Sequence[dict], left: bool = False) -> dict[str, torch.Tensor]:
    """Prompt ids only; left-padded for generation, right-padded for activations."""
    seqs = _prompt_ids(tokenizer, rows)
    width = max(map(len, seqs))
    ids = np.full((len(seqs), width), pad_id(tokenizer), dtype=np.int64)
    mask = np.zeros((len(seqs), width), dtype=np.int64)
    for i, s in enumerate(seqs):
        where = slice(width - len(s), width) if left else slice(0, len(s))
        ids[i, where], mask[i, where] = s, 1
    return {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)}


def _right_pad(seqs: list[list[int]], labels: list[list[int]], pad: int) -> dict[str, torch.Tensor]:
    width = max(map(len, seqs))
    ids = np.full((len(seqs), width), pad, dtype=np.int64)
    lab = np.full((len(seqs), width), IGNORE, dtype=np.int64)
    mask = np.zeros((len(seqs), width), dtype=np.int64)
    for i, (s, y) in enumerate(zip(seqs, labels, strict=True)):
        ids[i, : len(s)], lab[i, : len(y)], mask[i, : len(s)] = s, y, 1
    return {
        "input_ids": torch.from_numpy(ids),
        "attention_mask": torch.from_numpy(mask),
        "labels": torch.from_numpy(lab),
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
