"""How a question/answer row becomes tokens: one rendering for every stage.

A prompt format renders a row as one text, prompt then answer then the answer's end:

* ``chat``: the tokenizer's own chat template, the question as the user's turn and the answer
  as the assistant's, ended by the template's end-of-turn token (the default where the
  tokenizer has a chat template);
* a template holding ``{question}`` then ``{answer}``, e.g. :data:`QA_TEMPLATE` (the default
  without a chat template); the answer is ended by EOS;
* ``raw``: the template ``{question}{separator}{answer}``.

The text is tokenized whole and split at the answer's character offset: the first token that
overlaps the answer starts it. The answer's tokens are then the model's own after that prompt,
whatever the tokenizer does to spaces (a byte-level BPE's " Paris", a Llama-2 style "▁Paris"),
where tokenizing the answer apart would start it with a token the model never emits there.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

AUTO, CHAT, RAW = "auto", "chat", "raw"
QA_TEMPLATE = "Q: {question}\nA: {answer}"
"""The template without a chat template; the embedded model is trained in it."""


def check_format(value: str) -> str:
    """A valid ``prompt_format``: auto, chat, raw, or a template with ``{question}`` once and
    then ``{answer}`` once."""
    if value in (AUTO, CHAT, RAW):
        return value
    if value.count("{question}") != 1 or value.count("{answer}") != 1:
        raise ValueError(
            f"prompt format {value!r} is not auto, chat or raw, and not a template with "
            "{question} and {answer} once each"
        )
    if value.index("{question}") > value.index("{answer}"):
        raise ValueError(f"prompt format {value!r}: {{question}} must come before {{answer}}")
    return value


@dataclass(frozen=True)
class Encoded:
    """One row's tokens: the prompt, the answer, and what ends the answer (EOS or end of turn)."""

    prompt: list[int]
    answer: list[int]
    end: list[int]


@dataclass(frozen=True)
class Renderer:
    """A tokenizer with the prompt format every stage renders rows in."""

    tokenizer: Any
    template: str | None  # None: the tokenizer's chat template

    @property
    def name(self) -> str:
        """``chat`` or the template, for reports."""
        return CHAT if self.template is None else self.template

    @property
    def pad_id(self) -> int:
        """The padding id (EOS where the tokenizer has no pad token; pads are masked anyway)."""
        tok = self.tokenizer
        return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def encode(self, rows: Sequence[dict]) -> list[Encoded]:
        """Every row's prompt, answer and end tokens, the batch tokenized in one call."""
        if not rows:
            return []  # tokenizers fail on an empty batch
        texts, spans = zip(*(self._text(r) for r in rows), strict=True)
        encoded = self.tokenizer(list(texts), add_special_tokens=False, return_offsets_mapping=True)
        bos = (
            []
            if self.template is None or self.tokenizer.bos_token_id is None
            else [self.tokenizer.bos_token_id]
        )
        out = []
        for ids, offsets, (start, stop), row in zip(
            encoded["input_ids"], encoded["offset_mapping"], spans, rows, strict=True
        ):
            first = next((i for i, (_, e) in enumerate(offsets) if e > start), len(ids))
            after = next((i for i in range(first, len(ids)) if offsets[i][0] >= stop), len(ids))
            if first == after:
                raise ValueError(f"row {row.get('id', '')!r}: the answer has no tokens")
            out.append(Encoded(bos + ids[:first], ids[first:after], self._end(ids[after:])))
        return out

    def stop_ids(self, encoded: Sequence[Encoded]) -> list[int]:
        """The tokens that end a generated answer: EOS and the format's end of turn."""
        ids = {e.end[-1] for e in encoded} | {self.tokenizer.eos_token_id}
        return sorted(i for i in ids if i is not None)

    def _text(self, row: dict) -> tuple[str, tuple[int, int]]:
        """The row's whole text and its answer's character span."""
        question, answer = row["question"], row["answer"].strip()
        if self.template is not None:
            before, after = self.template.split("{answer}")
            prompt = before.replace("{question}", question)
            return prompt + answer + after, (len(prompt), len(prompt) + len(answer))
        user = [{"role": "user", "content": question}]
        prompt = self.tokenizer.apply_chat_template(
            user, tokenize=False, add_generation_prompt=True
        )
        text = self.tokenizer.apply_chat_template(
            [*user, {"role": "assistant", "content": answer}], tokenize=False
        )
        shared = next(
            (i for i, (a, b) in enumerate(zip(prompt, text, strict=False)) if a != b), len(prompt)
        )
        start = text.find(answer, shared)
        if start < 0:
            raise ValueError(
                "the tokenizer's chat template does not reproduce the answer verbatim; "
                "give a template prompt format instead of chat"
            )
        return text, (start, start + len(answer))

    def _end(self, suffix: list[int]) -> list[int]:
        """The answer's end: EOS after a template (and its text after ``{answer}``); for a chat
        template, its tokens up to the first special one (the end of turn)."""
        eos = self.tokenizer.eos_token_id
        if self.template is not None:
            return [*suffix, eos]
        special = set(self.tokenizer.all_special_ids) | {
            i for i, t in self.tokenizer.added_tokens_decoder.items() if t.special
        }
        for k, token in enumerate(suffix):
            if token in special:
                return suffix[: k + 1]
        return [*suffix, eos]


def renderer(tokenizer, prompt_format: str = AUTO, separator: str = "\n") -> Renderer:
    """The renderer of ``prompt_format`` (see the module docstring) for ``tokenizer``."""
    check_format(prompt_format)
    has_chat = bool(getattr(tokenizer, "chat_template", None))
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            "prompt formats need a fast tokenizer (tokenizer.json): it maps tokens to "
            "characters, so the answer is split off where the model's own tokens start it"
        )
    if prompt_format == CHAT and not has_chat:
        raise ValueError(
            "prompt format 'chat' asked for, but the tokenizer has no chat template; give "
            f"'raw' or a template such as {QA_TEMPLATE!r}"
        )
    if prompt_format == AUTO:
        return Renderer(tokenizer, None if has_chat else QA_TEMPLATE)
    if prompt_format == RAW:
        return Renderer(tokenizer, "{question}" + separator + "{answer}")
    return Renderer(tokenizer, None if prompt_format == CHAT else prompt_format)
