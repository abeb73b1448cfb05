"""The bundle's prompt library, and drafting from it for speculative decoding.

A trained policy mostly writes prompts it saw in training: D0's pool and the prompts later loops
kept. ``qpo export`` writes those prompts into the bundle as ``library.json``, already tokenized
the way the policy was trained to write them (the prompt's tokens, capped at
``prompt_max_tokens``, then the policy's first EOS id), with how many training records held each.

At decode time a :class:`Drafter` guesses how a row goes on from what it has generated so far:
the continuation of the library prompts that start with those tokens (the most frequent branch
of a token trie), or, once a row has left every library prompt, the tokens that followed its last
few tokens in some library prompt (prompt lookup). The generator verifies a whole draft in one
forward pass and keeps only the tokens greedy decoding would have chosen, so drafts change speed,
never output.

With the ``choose`` strategy (:mod:`qpo_middleware.choice`) the library is also the set the policy
chooses from: each prompt may carry an ``offset``, the mean log-probability of the prompt under the
policy's DPO reference over training queries, subtracted from the policy's score so that a prompt
the reference already favoured on every query gets no credit for that. A policy trained on label routes
carries a route table instead (``routes``, :class:`~qpo_middleware.choice.RouteTable`): 'choose' scores
only the routes and sends the library prompt with the most expected right answers under the label
posterior they give. This module is the one definition of the library file.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .bundle import BundleError
from .choice import RouteTable
from .policy_format import PolicyFormat, brief_repr

LIBRARY_FILE = "library.json"
LIBRARY_FORMAT = "qpo-prompt-library"
# 2 added the optional per-prompt "offset", 3 the optional top-level "routes"; older files are still read
LIBRARY_VERSION = 3
READ_VERSIONS = (1, 2, 3)
MAX_LIBRARY_PROMPTS = 1_000_000
# Prompt lookup: the longest and shortest suffix of a row that is looked up in the library, and the most
# tokens such a guess drafts (a guess from 2-3 tokens is often wrong, and a wide pass that is rejected costs more
# than a plain step; a row still on a library prompt's trie path drafts the whole rest of it).
LOOKUP_NGRAMS = (3, 2)
LOOKUP_MAX_DRAFT = 4


@dataclass(frozen=True)
class LibraryPrompt:
    """One distinct training prompt: its text, the ids the policy writes for it (EOS last), its record count,
    and its choice offset (``None``: scored by the policy's log-probability alone)."""

    text: str
    ids: tuple[int, ...]
    count: int = 1
    offset: float | None = None


def prompt_target_ids(policy: PolicyFormat, tokenize: Callable[[str], Sequence[int]], prompt: str) -> list[int]:
    """The ids the policy is trained to write for ``prompt``: its tokens without the policy's control
    tokens, capped at ``prompt_max_tokens``, then the first EOS id (a blank prompt is EOS alone).

    Training builds its targets with this function and export tokenizes the library with it.
    """
    ids = [int(t) for t in tokenize(prompt) if int(t) not in policy.special_ids] if prompt.strip() else []
    return [*ids[: policy.prompt_max_tokens], policy.eos_token_ids[0]]


def build_library(prompts: Mapping[str, int], policy: PolicyFormat, tokenize: Callable[[str], Sequence[int]],
                  offsets: Mapping[str, float] | None = None) -> list[LibraryPrompt]:
    """Library entries for ``prompts`` (text -> record count). A blank prompt (no instruction) is an entry
    too, ids EOS alone: strategy 'choose' may pick it, the drafter skips it (nothing to draft).
    ``offsets`` (text -> choice offset), when given, must cover every prompt.

    Sorted by count, most frequent first, then by text, so the file is the same for the same data.
    """
    kept = list(prompts)
    if offsets is not None:
        missing = [text for text in kept if text not in offsets]
        if missing:
            raise ValueError(f"{len(missing)} library prompt(s) have no choice offset, e.g. {brief_repr(missing[0])}; "
                             "the offsets must come from the same training records as the library.")
    entries = [LibraryPrompt(text, tuple(prompt_target_ids(policy, tokenize, text)), int(prompts[text]),
                             None if offsets is None else float(offsets[text]))
               for text in kept]
    return sorted(entries, key=lambda e: (-e.count, e.text))


def write_library(path: str | os.PathLike[str], entries: Iterable[LibraryPrompt],
                  routes: RouteTable | None = None) -> None:
    """Write ``library.json`` (the caller makes the write atomic: export writes into a staging directory), with
    ``routes`` when given (every prompt it names must be an entry)."""
    entries = list(entries)
    if routes is not None and (missing := _unlisted(routes, entries)):
        raise ValueError(f"The route table names {len(missing)} prompt(s) the library does not hold, e.g. "
                         f"{brief_repr(missing[0])}; build the library from the same run as the routes.")
    data = {
        "format": LIBRARY_FORMAT,
        "version": LIBRARY_VERSION,
        "prompts": [{"text": e.text, "ids": list(e.ids), "count": e.count,
                     **({} if e.offset is None else {"offset": e.offset})} for e in entries],
        **({} if routes is None else {"routes": routes.to_dict()}),
    }
    Path(path).write_text(json.dumps(data, ensure_ascii=False, separators=(",", ":")) + "\n", encoding="utf-8")


def _unlisted(routes: RouteTable, entries: Sequence[LibraryPrompt]) -> list[str]:
    texts = {e.text for e in entries}
    return [text for text in (*routes.routes, *routes.prompts) if text not in texts]


def read_library(path: str | os.PathLike[str], *, vocab_size: int, max_ids: int) -> list[LibraryPrompt]:
    """Read and validate ``library.json``'s prompts (:func:`load_library` without the route table)."""
    return load_library(path, vocab_size=vocab_size, max_ids=max_ids)[0]


def load_library(path: str | os.PathLike[str], *, vocab_size: int,
                 max_ids: int) -> tuple[list[LibraryPrompt], RouteTable | None]:
    """Read and validate ``library.json``: every id inside the vocabulary, at most ``max_ids`` ids per prompt; and
    its route table, if it has one, naming only library prompts.

    Raises :class:`BundleError` naming what is wrong. The checksum is checked with the other bundle files.
    """
    where = Path(path).name

    def bad(message: str) -> BundleError:
        return BundleError(f"{where}: {message}; re-export the bundle with `qpo export`.")

    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        raise BundleError(f"Cannot read the prompt library {where}: {exc}") from exc
    if not isinstance(data, dict) or data.get("format") != LIBRARY_FORMAT:
        raise bad(f"not a prompt library (format must be {LIBRARY_FORMAT!r})")
    version = data.get("version")
    if isinstance(version, bool) or version not in READ_VERSIONS:
        raise bad(f"version {brief_repr(version)} is not supported (this qpo-middleware reads "
                  f"{', '.join(map(str, READ_VERSIONS))})")
    prompts = data.get("prompts")
    if not isinstance(prompts, list) or len(prompts) > MAX_LIBRARY_PROMPTS:
        raise bad(f"'prompts' must be a list of at most {MAX_LIBRARY_PROMPTS} entries")
    entries = []
    for i, item in enumerate(prompts):
        fields = {"text", "ids", "count"}
        if not isinstance(item, dict) or not fields <= set(item) <= fields | ({"offset"} if version >= 2 else set()):
            raise bad(f"prompts[{i}] must be an object with text, ids and count"
                      + (" (and optionally offset)" if version >= 2 else ""))
        text, ids, count, offset = item["text"], item["ids"], item["count"], item.get("offset")
        ok_ids = isinstance(ids, list) and 1 <= len(ids) <= max_ids and all(
            isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab_size for t in ids)
        if not isinstance(text, str) or not ok_ids:
            raise bad(f"prompts[{i}] must have a text and 1..{max_ids} token ids below {vocab_size}; got "
                      f"{brief_repr(item)}")
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise bad(f"prompts[{i}].count must be an integer >= 1; got {brief_repr(count)}")
        if offset is not None and (isinstance(offset, bool) or not isinstance(offset, int | float)
                                   or not math.isfinite(offset)):
            raise bad(f"prompts[{i}].offset must be a finite number; got {brief_repr(offset)}")
        entries.append(LibraryPrompt(text, tuple(ids), count, None if offset is None else float(offset)))
    with_offset = {e.offset is None for e in entries}
    if len(with_offset) > 1:
        raise bad("either every prompt has an offset or none has")
    if set(data) - {"format", "version", "prompts", *(("routes",) if version >= 3 else ())}:
        raise bad(f"unknown field(s) {brief_repr(sorted(set(data) - {'format', 'version', 'prompts', 'routes'}))}")
    routes = None
    if "routes" in data:
        try:
            routes = RouteTable.from_dict(data["routes"])
        except ValueError as exc:
            raise bad(f"routes: {exc}") from exc
        if missing := _unlisted(routes, entries):
            raise bad(f"routes name {len(missing)} prompt(s) the library does not hold, e.g. {brief_repr(missing[0])}")
    return entries, routes


class _Node:
    __slots__ = ("best", "children", "weight")

    def __init__(self) -> None:
        self.children: dict[int, _Node] = {}
        self.weight = 0
        self.best: int | None = None  # the child token with the most weight under it


class Drafter:
    """Guesses the next tokens of a row from the library: trie continuation first, then prompt lookup.

    Pure Python over small dicts: a draft costs microseconds against milliseconds per forward pass.
    """

    def __init__(self, entries: Sequence[LibraryPrompt]) -> None:
        self.size = len(entries)
        self._root = _Node()
        # n-gram -> (ids of the most frequent prompt holding it, index after the n-gram there)
        self._lookup: dict[tuple[int, ...], tuple[tuple[int, ...], int]] = {}
        lookup_weight: dict[tuple[int, ...], int] = {}
        for entry in entries:
            if len(entry.ids) < 2:  # a blank prompt (EOS alone): drafting it would only end rows early
                continue
            node = self._root
            node.weight += entry.count
            for token in entry.ids:
                node = node.children.setdefault(token, _Node())
                node.weight += entry.count
            for n in LOOKUP_NGRAMS:
                for end in range(n, len(entry.ids)):
                    key = entry.ids[end - n : end]
                    if entry.count > lookup_weight.get(key, 0):
                        lookup_weight[key] = entry.count
                        self._lookup[key] = (entry.ids, end)
        stack = [self._root]
        while stack:
            node = stack.pop()
            if node.children:
                node.best = min(node.children, key=lambda t: (-node.children[t].weight, t))
                stack.extend(node.children.values())

    def draft(self, generated: Sequence[int], limit: int, *, lookup: bool = True) -> list[int]:
        """Up to ``limit`` tokens that may follow ``generated`` (the row's tokens so far); ``[]`` for no guess.

        ``lookup=False`` drafts only along the trie (for a row whose last guess was wrong).
        """
        if limit <= 0:
            return []
        node: _Node | None = self._root
        for token in generated:
            node = node.children.get(token) if node is not None else None
            if node is None:
                break
        out: list[int] = []
        if node is not None:  # the row is still the start of some library prompt
            while node.best is not None and len(out) < limit:
                out.append(node.best)
                node = node.children[node.best]
            return out
        for n in LOOKUP_NGRAMS if lookup else ():
            if len(generated) >= n:
                hit = self._lookup.get(tuple(generated[-n:]))
                if hit is not None:
                    ids, start = hit
                    return list(ids[start : start + min(limit, LOOKUP_MAX_DRAFT)])
        return []


def library_stats(entries: Sequence[LibraryPrompt]) -> dict[str, Any]:
    """Size figures for logs and ``PromptOptimizer.info``."""
    return {"prompts": len(entries), "tokens": sum(len(e.ids) for e in entries),
            "offsets": bool(entries) and entries[0].offset is not None}
