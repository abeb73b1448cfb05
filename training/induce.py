"""Prompt-pool induction (APE-style): an instruct model writes candidate instructions for a task.

The inducing model is shown a few labelled train examples and the label words and asked for the
instruction that produced them, once per request, with the examples and the style of the request
rotating (:data:`STYLES`: plain, role, step-by-step, format-constrained, terse), as APE does. Its
replies are cleaned and filtered (:func:`clean_candidate`, :func:`reject_reason`, :func:`filter_candidates`):
empty replies, bare label words, instructions naming exactly one label word, copies of an example, echoes of the request's own wording,
chat-template markup, over-long or cut-off replies and duplicates never enter the pool. The kept pool and the count of each drop reason are
written to the run's ``prompts.json`` (:func:`save_pool`) and read back on resume, never re-induced.

The meta-prompts, the cleaning and the filters are pure functions; the generation sits behind the
:data:`Inducer` callable, which answers a batch of requests: a local model (:class:`LocalInducer`,
one left-padded ``generate`` over the chat template) or any LangChain chat model
(:class:`ChatInducer`, ``module:factory``, through its ``batch``).
"""

from __future__ import annotations

import json
import os
import random
import re
import string
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from qpo_middleware.text import clean_prompt, strip_strings

from .io import atomic_write_json
from .tasks import Example, Task, names_one_label

STYLES: dict[str, str] = {
    "plain": "Write it as one plain sentence.",
    "role": "Begin it by giving the reader a role, for example 'You are a ...'.",
    "step_by_step": "Ask the reader to think step by step before giving the answer.",
    "format": "Say exactly which words the answer must be.",
    "terse": "Use at most ten words.",
}
"""Request styles, in rotation order: the hint added to the meta-prompt of each style."""

MAX_CHARS = 300
"""An induced instruction longer than this (in characters) is dropped as ``too_long``."""

MAX_NEW_TOKENS = 48
"""Tokens a local inducer may write per request; a reply cut at this budget is dropped as ``too_long``."""

DROP_REASONS = ("empty", "markup", "too_long", "label_word", "names_one_label", "copies_example", "echoes_request",
                "duplicate")
"""Why a candidate may be dropped, in the order the checks run."""

ECHO_SHARE = 0.75
"""A candidate whose word pairs come this much from the request's own wording echoes it (``echoes_request``)."""

ECHO_RUN = 6
"""A candidate that repeats this many consecutive words of a request sentence naming no label echoes it too
("Classify the article. Reply with the instruction itself in one or two sentences.")."""

# Chat-template markup of the common families: <|im_start|>, <|endoftext|>, [INST], <s>, </s>, <start_of_turn>.
_MARKUP = re.compile(r"<\|[^<>|\s]{1,40}\|>|\[/?INST\]|</?s>|<(?:start|end)_of_turn>")
_LEAD_IN = re.compile(r"^(?:\*\*)?(?:the\s+)?(?:instruction|prompt|answer)s?\s*(?:was|is)?\s*:\s*(?:\*\*)?\s*",
                      re.IGNORECASE)
_INSTRUCTION_IS_TO = re.compile(r"^(?:the\s+)?(?:instruction|task)\s+(?:is|was)\s+to\s+", re.IGNORECASE)
_QUOTES = "\"'`“”‘’"


@dataclass(frozen=True)
class Reply:
    """What an inducer wrote for one request; ``finished`` is False when it hit its token budget."""

    text: str
    finished: bool = True


Inducer = Callable[[list[list[dict[str, str]]], int], "Sequence[Reply | str]"]
"""An inducer: ``(a batch of requests' chat messages, seed) -> one Reply (or reply text) per request``."""

BATCH_SIZE = 8
"""Requests sent to an inducer at once (one ``generate`` call of a local model)."""


@dataclass(frozen=True)
class Request:
    """One induction request: its index, style, the train examples shown, and the chat messages."""

    index: int
    style: str
    example_ids: tuple[str, ...]
    messages: list[dict[str, str]]


@dataclass
class Candidate:
    """An induced instruction and where it came from; ``reason`` is set when it was dropped."""

    source: str  # induced:<style>:<i>
    style: str
    text: str
    raw: str
    example_ids: list[str]
    reason: str | None = None
    of: str | None = None  # a mutation: the prompt_source of the prompt it varies


@dataclass
class InducedPool:
    """The induced candidates of a run (``prompts.json``), or its mutated ones (``mutations.json``, ``from_top`` > 0):
    the settings, the kept pool, the drop counts."""

    inducer: str
    asked: int
    shots: int
    seed: int
    kept: list[Candidate]
    dropped: list[Candidate] = field(default_factory=list)
    v: int = 1
    from_top: int = 0  # a mutated pool (``mutations.json``): how many of D0's best prompts were varied; 0 = induced
    plain: bool = False  # a mutated pool: only prompts that do not steer the target on D0 were varied

    @property
    def prompts(self) -> list[tuple[str, str]]:
        """The kept candidates as (prompt_source, text), the form ``resolve_prompts`` returns."""
        return [(c.source, c.text) for c in self.kept]

    def drop_counts(self) -> dict[str, int]:
        counts = Counter(c.reason for c in self.dropped)
        return {reason: counts[reason] for reason in DROP_REASONS if counts[reason]}

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "kept_count": len(self.kept), "drop_counts": self.drop_counts()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> InducedPool:
        return cls(inducer=data["inducer"], asked=data["asked"], shots=data["shots"], seed=data["seed"],
                   kept=[Candidate(**c) for c in data["kept"]], dropped=[Candidate(**c) for c in data["dropped"]],
                   v=data.get("v", 1), from_top=data.get("from_top", 0), plain=data.get("plain", False))


# -- meta-prompts ------------------------------------------------------------------------------


def requests(task: Task, train: Sequence[Example], count: int, shots: int, seed: int) -> list[Request]:
    """``count`` requests: style ``i`` cycles through :data:`STYLES`, examples are drawn per (seed, i).

    For a classification task every label is shown at least once when ``shots`` allows; the
    draws depend only on the seed, the index and the train examples, so they repeat exactly.
    """
    if not train:
        raise ValueError("Induction needs labelled train examples; the train split is empty.")
    styles = list(STYLES)
    out = []
    for index in range(count):
        style = styles[index % len(styles)]
        shown = _draw_examples(task, train, shots, random.Random(f"{seed}:induce:{index}"))
        out.append(Request(index, style, tuple(e.id for e in shown), meta_prompt(task, shown, style)))
    return out


def _draw_examples(task: Task, train: Sequence[Example], shots: int, rng: random.Random) -> list[Example]:
    shots = min(shots, len(train))
    chosen: list[Example] = []
    if task.kind == "classification":  # one example of each label first, while shots allow
        for label in rng.sample(range(len(task.labels)), len(task.labels)):
            with_label = [e for e in train if e.label == label and e not in chosen]
            if with_label and len(chosen) < shots:
                chosen.append(rng.choice(with_label))
    rest = [e for e in train if e not in chosen]
    chosen += rng.sample(rest, shots - len(chosen))
    rng.shuffle(chosen)
    return chosen


def meta_prompt(task: Task, examples: Sequence[Example], style: str) -> list[dict[str, str]]:
    """The chat messages of one request: labelled examples, the answer format, and the style's hint."""
    shown = "\n\n".join(f"Input: {e.query}\nOutput: {task.gold_text(e)}" for e in examples)
    if task.kind == "classification":
        answers = f"The output is always one of these words: {', '.join(task.labels)}."
    else:
        answers = "The output is always a number."
    user = (
        "I gave a friend an instruction. Following it, the friend wrote the output for each input below.\n\n"
        f"{shown}\n\n{answers}\n"
        f"What was the instruction? {STYLES[style]} "
        "Reply with the instruction itself in one or two sentences: no list of steps, no examples."
    )
    return [{"role": "system", "content": "You are a helpful assistant who writes clear instructions."},
            {"role": "user", "content": user}]


def variation_prompt(task: Task, prompt: str, style: str) -> list[dict[str, str]]:
    """The chat messages asking for a variation of ``prompt`` (the mutation step of the loops): the same job,
    other words, the style's hint."""
    if task.kind == "classification":
        answers = f"The answer is always one of these words: {', '.join(task.labels)}."
    else:
        answers = "The answer is always a number."
    user = (
        f"This instruction makes a reader answer an input well:\n\n{prompt}\n\n{answers}\n"
        f"Write a different instruction for the same job, in other words. {STYLES[style]} "
        "Reply with the instruction itself in one or two sentences: no list of steps, no examples."
    )
    return [{"role": "system", "content": "You are a helpful assistant who writes clear instructions."},
            {"role": "user", "content": user}]


def request_wording(task: Task, style: str) -> str:
    """The words of a ``style`` request without its examples: what an echoing reply repeats."""
    return " ".join(m["content"] for m in meta_prompt(task, [], style))


# -- cleaning and filtering ----------------------------------------------------------------------


def clean_candidate(raw: str) -> str:
    """The instruction in a reply: its first paragraph, without a lead-in ("Instruction:") or outer quotes."""
    text = clean_prompt(raw)
    text = text.split("\n\n", 1)[0].strip()
    text = _LEAD_IN.sub("", text).strip()
    if (to := _INSTRUCTION_IS_TO.match(text)) and text[to.end():]:  # "The instruction is to classify ..."
        text = text[to.end()].upper() + text[to.end() + 1:]
    while len(text) >= 2 and text[0] in _QUOTES and text[-1] in _QUOTES:
        text = text[1:-1].strip()
    return " ".join(text.split())


def _key(text: str) -> str:
    """Text compared for duplicates and copies: case-folded words, no punctuation."""
    return " ".join(text.casefold().translate(str.maketrans("", "", string.punctuation)).split())


def _pairs(key: str) -> list[tuple[str, ...]]:
    words = key.split()
    return [tuple(words[i : i + 2]) for i in range(len(words) - 1)] or [tuple(words)]


def echoes(text: str, request: str, labels: Sequence[str] = ()) -> bool:
    """Whether ``text`` is mostly the request's own wording ("Write the output for each input below."), or repeats
    :data:`ECHO_RUN` consecutive words of one of its sentences that names none of ``labels`` (the sentence listing
    the label words is one a good instruction may well repeat)."""
    key = _key(text)
    pairs, wording = _pairs(key), set(_pairs(_key(request)))
    if sum(p in wording for p in pairs) >= ECHO_SHARE * len(pairs):
        return True
    label_words = {word for label in labels for word in _key(label).split()}
    padded = f" {key} "
    for sentence in re.split(r"(?<=[.?!])\s+|\n+", request):
        words = _key(sentence).split()
        if label_words & set(words):
            continue
        if any(f" {' '.join(words[i : i + ECHO_RUN])} " in padded for i in range(len(words) - ECHO_RUN + 1)):
            return True
    return False


def reject_reason(raw: str, text: str, *, labels: Sequence[str], examples: Sequence[str], request: str = "",
                  special_strings: Sequence[str] = (), finished: bool = True, max_chars: int = MAX_CHARS) -> str | None:
    """Why a candidate (``raw`` reply, ``text`` cleaned) may not enter the pool, or None when it may.

    ``examples`` are the texts of the examples the inducer was shown, ``request`` the wording of the
    request without them (:func:`request_wording`); ``special_strings`` the
    inducer's special-token strings (chat-template markup is caught without them too);
    ``finished`` is False when the reply ran out of tokens (then only a first paragraph that
    ended before the cut is whole). The reasons are :data:`DROP_REASONS`, but ``duplicate``,
    which :func:`filter_candidates` decides across candidates.
    """
    if not text:
        return "empty"
    if _MARKUP.search(raw) or strip_strings(raw, special_strings) != raw:
        return "markup"
    # Cut off: the budget ran out inside the instruction's paragraph, or it ends where a list would start.
    if (not finished and "\n\n" not in clean_prompt(raw)) or text.endswith(":") or len(text) > max_chars:
        return "too_long"
    label_keys = {_key(label) for label in labels}
    if label_keys and set(_key(text).split()) <= label_keys | {"or", "and"}:
        return "label_word"
    if names_one_label(text, labels):  # "...the output is Sports": a lean, not an instruction
        return "names_one_label"
    key = _key(text)
    for example in examples:
        shown = _key(example)
        if shown == key or (min(len(shown), len(key)) >= 20  # a short text is not a copy by containment
                            and (f" {shown} " in f" {key} " or f" {key} " in f" {shown} ")):
            return "copies_example"
    if request and echoes(text, request, labels):
        return "echoes_request"
    return None


def filter_candidates(candidates: Sequence[Candidate], *, labels: Sequence[str], examples: dict[str, str],
                      wording: dict[str, str] | None = None, existing: Sequence[str] = (), special_strings: Sequence[str] = (),
                      finished: Sequence[bool] | None = None, max_chars: int = MAX_CHARS) -> list[Candidate]:
    """Set each candidate's ``reason`` (None: kept); the first of equal texts is kept, later ones are
    ``duplicate``, as are texts equal to an ``existing`` (given pool) prompt. ``examples`` maps example
    ids to their text, ``wording`` styles to their request's wording. Returns the candidates."""
    seen = {_key(text) for text in existing}
    for i, candidate in enumerate(candidates):
        candidate.reason = reject_reason(
            candidate.raw, candidate.text, labels=labels, examples=[examples[e] for e in candidate.example_ids],
            request=(wording or {}).get(candidate.style, ""), special_strings=special_strings, finished=True if finished is None else finished[i], max_chars=max_chars)
        if candidate.reason is None:
            if _key(candidate.text) in seen:
                candidate.reason = "duplicate"
            seen.add(_key(candidate.text))
    return list(candidates)


# -- the job -------------------------------------------------------------------------------------


def induce(task: Task, train: Sequence[Example], count: int, inducer: Inducer, *, inducer_id: str, shots: int = 4,
           seed: int = 0, existing: Sequence[str] = (), special_strings: Sequence[str] = (),
           batch_size: int = BATCH_SIZE, progress: Callable[[int], None] | None = None) -> InducedPool:
    """Ask ``inducer`` ``count`` times (see :func:`requests`; ``batch_size`` at once, each batch
    under its own seed), clean and filter the replies."""
    todo = requests(task, train, count, shots, seed)
    replies = ask(inducer, [r.messages for r in todo], seed, batch_size, progress)
    candidates = [Candidate(f"induced:{request.style}:{request.index}", request.style, clean_candidate(reply.text),
                            reply.text, list(request.example_ids)) for request, reply in zip(todo, replies, strict=True)]
    finished = [reply.finished for reply in replies]
    shown = {e.id: e.query for e in train}
    wording = {style: request_wording(task, style) for style in STYLES}
    filter_candidates(candidates, labels=task.labels, examples=shown, wording=wording, existing=existing,
                      special_strings=special_strings or getattr(inducer, "special_strings", ()), finished=finished)
    return InducedPool(inducer=inducer_id, asked=count, shots=shots, seed=seed,
                       kept=[c for c in candidates if c.reason is None],
                       dropped=[c for c in candidates if c.reason is not None])


def ask(inducer: Inducer, messages: Sequence[list[dict[str, str]]], seed: int, batch_size: int = BATCH_SIZE,
        progress: Callable[[int], None] | None = None) -> list[Reply]:
    """``inducer``'s reply to each request, ``batch_size`` at once, each batch under its own seed."""
    out: list[Reply] = []
    for start in range(0, len(messages), batch_size):
        batch = list(messages[start : start + batch_size])
        replies = list(inducer(batch, seed * 100_003 + start))
        if len(replies) != len(batch):
            raise RuntimeError(f"The inducer gave {len(replies)} replies to {len(batch)} requests.")
        out += [reply if isinstance(reply, Reply) else Reply(str(reply)) for reply in replies]
        if progress:
            progress(len(batch))
    return out


def mutate(task: Task, prompts: Sequence[str], inducer: Inducer, *, seed: int = 0, existing: Sequence[str] = (),
           special_strings: Sequence[str] = (), batch_size: int = BATCH_SIZE) -> list[Candidate]:
    """One variation of each of ``prompts`` (:func:`variation_prompt`, styles rotating), cleaned and filtered
    like induced candidates: a variation equal to a known prompt (``existing``, or its own original) is a
    ``duplicate``. Returns every candidate, source ``mutation:<style>:<i>``; ``reason`` None = kept."""
    styles = list(STYLES)
    asked = [(i, styles[(seed + i) % len(styles)], prompt) for i, prompt in enumerate(prompts)]
    replies = ask(inducer, [variation_prompt(task, prompt, style) for _, style, prompt in asked], seed, batch_size)
    candidates = [Candidate(f"mutation:{style}:{i}", style, clean_candidate(reply.text), reply.text, [])
                  for (i, style, _), reply in zip(asked, replies, strict=True)]
    wording = {style: " ".join(m["content"] for m in variation_prompt(task, "", style)) for style in styles}
    return filter_candidates(candidates, labels=task.labels, examples={}, wording=wording,
                             existing=[*existing, *prompts],
                             special_strings=special_strings or getattr(inducer, "special_strings", ()),
                             finished=[reply.finished for reply in replies])


def save_pool(path: str | os.PathLike[str], pool: InducedPool) -> None:
    atomic_write_json(Path(path), pool.to_dict())


def load_pool(path: str | os.PathLike[str]) -> InducedPool:
    return InducedPool.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))


# -- inducers ------------------------------------------------------------------------------------


class LocalInducer:
    """A local instruct model (a name or path :func:`~.models.resolve_model` knows) writing with ``generate``.

    The chat template is applied; a batch of requests is left-padded into one ``generate`` call and
    sampled (temperature 0.7, top-p 0.9) under the batch's seed, at most :data:`MAX_NEW_TOKENS`
    tokens per reply.
    """

    def __init__(self, model: str, max_new_tokens: int = MAX_NEW_TOKENS, do_sample: bool = True,
                 temperature: float = 0.7, top_p: float = 0.9, device: str = "auto") -> None:
        import torch

        from qpo_middleware.text import special_token_strings

        from .models import load_model_and_tokenizer

        self.lm, self.tok = load_model_and_tokenizer(model)
        self.tok.padding_side = "left"
        self.device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        self.lm.to(self.device)
        self.max_new_tokens, self.do_sample = max_new_tokens, do_sample
        self.sampling = {"temperature": temperature, "top_p": top_p, "top_k": 0} if do_sample else {}
        self.special_strings = special_token_strings(self.tok)
        self._stop = {i for i in (self.tok.eos_token_id, self.tok.pad_token_id) if i is not None}

    def __call__(self, batch: list[list[dict[str, str]]], seed: int) -> list[Reply]:
        import torch

        texts = [self.tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in batch]
        inputs = self.tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        ids, mask = inputs["input_ids"].to(self.device), inputs["attention_mask"].to(self.device)  # (B, T)
        rng_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        try:
            with torch.no_grad():
                out = self.lm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=self.max_new_tokens,
                                       do_sample=self.do_sample, **self.sampling,
                                       pad_token_id=self.tok.pad_token_id)  # (B, T + new)
        finally:
            torch.random.set_rng_state(rng_state)
        replies = []
        for row in out[:, ids.shape[1]:].tolist():
            finished = any(t in self._stop for t in row)
            if finished:  # the end of turn and the padding after it are not part of the reply
                row = row[: next(i for i, t in enumerate(row) if t in self._stop)]
            replies.append(Reply(self.tok.decode(row, skip_special_tokens=False), finished))
        return replies


class ChatInducer:
    """A LangChain chat model (``module:factory``) as the inducer, through its own ``batch``; the seed is not passed on."""

    def __init__(self, model: Any) -> None:
        from .chat_target import load_chat_model

        self.model = load_chat_model(model) if isinstance(model, str) else model

    def __call__(self, batch: list[list[dict[str, str]]], seed: int) -> list[Reply]:
        roles = {"user": "human", "assistant": "ai"}
        replies = self.model.batch([[(roles.get(m["role"], m["role"]), m["content"]) for m in messages]
                                    for messages in batch])
        return [Reply(r.content if isinstance(r.content, str) else str(r.content)) for r in replies]


def make_inducer(spec: str) -> Inducer:
    """An inducer from a CLI name: ``module:factory`` is a LangChain chat model, anything else a local model."""
    if ":" in spec and not Path(spec).exists():
        return ChatInducer(spec)
    return LocalInducer(spec)
