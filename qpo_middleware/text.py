"""Text rules shared by training and serving: what the policy reads, and what a prompt may contain.

This module imports neither ONNX Runtime nor torch, so the training loops, the benchmarks and the
runtime take the same rules from one place: the prompt scored in training is the prompt served.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from typing import Any

PROMPT_CHARS_PER_TOKEN = 32
"""A prompt is cut to ``max_new_tokens * PROMPT_CHARS_PER_TOKEN`` characters (English averages
about 4 per token; only runs of repeated symbols, which some vocabularies merge into one
token of up to ~80 characters, come near it)."""


def policy_text(query: str) -> str:
    """The copy of ``query`` the policy reads: lone surrogates become U+FFFD.

    A Python ``str`` may hold surrogate code points (from ``surrogateescape`` or
    ``surrogatepass`` decoding, or a JSON ``"\\ud800"``) that UTF-8, hence the tokenizer,
    cannot encode. A well-formed pair is joined into the character it encodes; a lone
    surrogate becomes U+FFFD. Every other string (control characters and NULs
    included) is returned as is. Only the policy's input changes: the rendered
    ``text`` keeps the query verbatim.
    """
    try:
        query.encode("utf-8")
    except UnicodeEncodeError:
        return query.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
    return query


def strip_strings(text: str, strings: Sequence[str]) -> str:
    """``text`` without any of ``strings``, removed until none is left (a removal may join a new one)."""
    while True:
        before = text
        for s in strings:
            text = text.replace(s, "")
        if text == before:
            return text


def clean_prompt(text: str) -> str:
    """Drop control/format characters (keep newline and tab), undecodable bytes, outer whitespace."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    kept = (
        ch
        for ch in text
        if ch in "\n\t" or (unicodedata.category(ch) not in ("Cc", "Cf", "Cs", "Co") and ch != "\ufffd")
    )
    return "".join(kept).strip()


def special_token_strings(tokenizer: Any) -> tuple[str, ...]:
    """The contents of a tokenizer's special added tokens, longest first.

    ``tokenizer`` is a ``tokenizers.Tokenizer`` (the runtime's), or a transformers fast tokenizer
    (training's), whose ``backend_tokenizer`` is one.
    """
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    added = backend.get_added_tokens_decoder().values()
    return tuple(sorted({t.content for t in added if t.special and t.content}, key=len, reverse=True))


def finish_prompt(decoded: str, special_strings: Sequence[str], max_new_tokens: int) -> str:
    """The prompt as served (and as scored in training): cleaned, no special-token strings, capped."""
    prompt = strip_strings(clean_prompt(decoded), special_strings)
    return prompt[: max_new_tokens * PROMPT_CHARS_PER_TOKEN].strip()
