"""How a checkpoint's problems are told: one ValueError naming the folder and every problem,
names and values from the checkpoint's own files escaped, long lists and messages cut short."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _shown(name: str) -> str:
    """A file name as a message shows it: quoted and escaped where it holds anything unprintable
    (a name is the folder owner's to choose, and could hold terminal escapes)."""
    return name if name.isprintable() else ascii(name)


def _printable(text: str) -> str:
    """``text`` with anything unprintable escaped: messages quote names and values from the
    checkpoint's files (tensor names, shard names, config values)."""
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


def _refuse(folder: Path | str, problems: list[str]) -> None:
    """One ValueError naming the folder and every problem (none: nothing raised)."""
    problems = [_printable(p) for p in problems]
    if len(problems) == 1:
        raise ValueError(f"checkpoint {folder}: {problems[0]}")
    if problems:
        raise ValueError(f"checkpoint {folder}:" + "".join(f"\n    - {p}" for p in problems))


def _some(items: list[str], shown: int = 3, total: int | None = None) -> str:
    """The first few items, and how many more there are (of ``total``, if more than listed)."""
    total = len(items) if total is None else total
    more = f" (and {total - shown} more)" if total > shown else ""
    return "; ".join(items[:shown]) + more


def _short(exc: Exception) -> str:
    """An exception as a problem line quotes it: its type and (the start of) its message."""
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= 300 else text[:300] + "..."


def _keys(value: Any) -> Any:
    return sorted(value) if isinstance(value, dict) else value
