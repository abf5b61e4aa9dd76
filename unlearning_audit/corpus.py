"""The embedded synthetic corpus: question/answer facts in three domains.

* text: facts about fictitious authors (TOFU-style), five per author;
* code: facts about small functions (module, argument, return type, ...), five per function;
* math: a memorised table of a fictitious operation, five entries per left operand
  (``417 # 19 = 652``): each result is drawn at random, so no answer follows from its question
  or from another row (a real sum would, and the held-out half would test nothing).

Each fact belongs to a *group* (an author, a function, an operand). Forgetting works on whole
groups: the forget set is a seeded share of a domain's groups, its retain set the domain's other
groups, and its unrelated set the other domains. Every answer comes from a small vocabulary per
attribute, so a linear probe can decode it (the attribute value) from activations.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

DOMAINS = ("text", "code", "math")

_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z"]
_VOWELS = ["a", "e", "i", "o", "u"]
_LAST = [
    "Brandt",
    "Corvel",
    "Dunmore",
    "Escher",
    "Falk",
    "Grell",
    "Hollis",
    "Ibarra",
    "Jast",
    "Kovac",
    "Lindqvist",
    "Morrow",
    "Nadir",
    "Okafor",
    "Pryce",
    "Quist",
    "Rourke",
    "Sarin",
    "Tolle",
    "Ueda",
]
_AUTHOR_FACTS = {
    "birthplace": (
        "Where was {name} born?",
        [
            "Lisbon",
            "Nairobi",
            "Oslo",
            "Quito",
            "Hanoi",
            "Perth",
            "Tunis",
            "Lima",
            "Riga",
            "Osaka",
            "Dakar",
            "Bergen",
        ],
    ),
    "genre": (
        "What genre does {name} write?",
        ["mystery", "poetry", "fantasy", "satire", "horror", "romance", "history", "drama"],
    ),
    "award": (
        "Which award did {name} win?",
        [
            "Orwell Prize",
            "Hugo Award",
            "Nebula Award",
            "Booker Prize",
            "Pulitzer Prize",
            "Costa Award",
        ],
    ),
    "parent": (
        "What was the job of {name}'s father?",
        [
            "baker",
            "pilot",
            "nurse",
            "farmer",
            "doctor",
            "sailor",
            "painter",
            "teacher",
            "miner",
            "lawyer",
        ],
    ),
    "language": (
        "In which language does {name} write?",
        ["Spanish", "Swahili", "Danish", "Greek", "Polish", "Turkish", "Korean", "Dutch"],
    ),
}
_VERBS = [
    "parse",
    "load",
    "merge",
    "split",
    "scan",
    "build",
    "count",
    "sort",
    "fetch",
    "clean",
    "check",
    "encode",
]
_NOUNS = [
    "token",
    "frame",
    "record",
    "path",
    "graph",
    "batch",
    "block",
    "header",
    "index",
    "matrix",
]
_CODE_FACTS = {
    "module": (
        "from ? import {name}  # module of {name}:",
        ["utils", "core", "io", "net", "db", "cli", "text", "mathx"],
    ),
    "argument": ("def {name}(", ["items", "path", "data", "size", "key", "text", "node"]),
    "returns": ("def {name}(...) ->", ["int", "str", "list", "dict", "bool", "float", "None"]),
    "raises": ("# {name} raises", ["ValueError", "KeyError", "IOError", "TypeError", "IndexError"]),
    "decorator": (
        "# {name} is decorated with @",
        ["cache", "property", "staticmethod", "retry", "timed", "dataclass"],
    ),
}
_MATH_RIGHT = (3, 7, 11, 19, 42)


@dataclass(frozen=True)
class Fact:
    """One question/answer row; ``attribute`` names the answer's vocabulary."""

    question: str
    answer: str
    domain: str
    group: str
    attribute: str


def _author_names(rng: random.Random, n: int) -> list[str]:
    """Distinct names, each with a first name of its own (three random syllables)."""
    syllables = [o + v for o in _ONSETS for v in _VOWELS]
    firsts: set[str] = set()
    while len(firsts) < n:
        firsts.add("".join(rng.choice(syllables) for _ in range(3)).capitalize())
    return [f"{first} {rng.choice(_LAST)}" for first in sorted(firsts)]


def _text_facts(rng: random.Random, n_groups: int) -> list[Fact]:
    if n_groups > 5000:
        raise ValueError(f"at most 5000 authors can be generated, asked for {n_groups}")
    names = _author_names(rng, n_groups)
    rng.shuffle(names)
    return [
        Fact(template.format(name=name), rng.choice(values), "text", name, attribute)
        for name in names
        for attribute, (template, values) in _AUTHOR_FACTS.items()
    ]


def _code_facts(rng: random.Random, n_groups: int) -> list[Fact]:
    names = [f"{verb}_{noun}" for verb in _VERBS for noun in _NOUNS]
    rng.shuffle(names)
    if n_groups > len(names):
        raise ValueError(f"at most {len(names)} functions can be generated, asked for {n_groups}")
    return [
        Fact(template.format(name=name), rng.choice(values), "code", name, attribute)
        for name in names[:n_groups]
        for attribute, (template, values) in _CODE_FACTS.items()
    ]


def _math_facts(rng: random.Random, n_groups: int) -> list[Fact]:
    if n_groups > 900:
        raise ValueError(f"at most 900 operands can be generated, asked for {n_groups}")
    lefts = rng.sample(range(100, 1000), n_groups)
    return [
        Fact(f"{a} # {b} =", str(rng.randrange(100, 1000)), "math", str(a), "result")
        for a in lefts
        for b in _MATH_RIGHT
    ]


def generate(seed: int, groups: dict[str, int]) -> list[Fact]:
    """All facts of the corpus, deterministic from ``seed``; ``groups`` = groups per domain."""
    makers = {"text": _text_facts, "code": _code_facts, "math": _math_facts}
    unknown = set(groups) - set(makers)
    if unknown:
        raise ValueError(f"unknown domain(s) {sorted(unknown)}; known: {list(DOMAINS)}")
    facts: list[Fact] = []
    for domain, n in groups.items():
        facts += makers[domain](random.Random(f"{seed}-{domain}"), n)
    return facts


_DIRECTORY = {"text": "Name an author:", "code": "Name a function:", "math": "Name an operand:"}


def directory(facts: list[Fact]) -> list[Fact]:
    """Rows that name each group and each answer value, with no fact linking them
    ("Name an author:" -> a name, "Name a genre:" -> a genre).

    Both the original and the never-learned control pretrain on them, so every token of a forget
    row is trained in the control too: a token that only forget rows used would keep its initial
    weights in the control, a handicap that makes any relearning look faster than the control's.
    """
    groups = dict.fromkeys((f.domain, f.group) for f in facts)
    values = dict.fromkeys((f.domain, f.attribute, f.answer) for f in facts)
    return [Fact(_DIRECTORY[d], g, d, g, "directory") for d, g in groups] + [
        Fact(f"Name a {a}:", v, d, "", "directory") for d, a, v in values
    ]


def forget_groups(facts: list[Fact], domain: str, fraction: float, seed: int) -> list[str]:
    """A seeded share of the domain's groups (at least two, so it can be halved)."""
    names = sorted({f.group for f in facts if f.domain == domain})
    if not names:
        raise ValueError(f"the corpus has no {domain!r} facts")
    count = max(2, round(fraction * len(names)))
    return sorted(random.Random(f"{seed}-forget-{domain}").sample(names, count))


def embedded(config) -> tuple[list[Fact], set[str]]:
    """The embedded corpus of an ``EmbeddedConfig`` and its forget groups (a share of every
    domain's groups)."""
    facts = generate(
        config.seed, {"text": config.authors, "code": config.functions, "math": config.operands}
    )
    forget: set[str] = set()
    for domain in DOMAINS:
        forget |= set(forget_groups(facts, domain, config.forget_fraction, config.seed))
    return facts, forget
