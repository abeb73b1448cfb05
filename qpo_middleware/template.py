"""Render (prompt, query) into what the target LLM sees.

Training scores prompts with :meth:`Template.render` and production renders
with the very same function, so what was rewarded is what is sent. The query
text always appears verbatim in the result; the prompt is only added around it.
"""

from __future__ import annotations

import string
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from .policy_format import brief_repr

Placement = Literal["before", "after", "system"]
PLACEMENTS: tuple[str, ...] = ("before", "after", "system")

_MAX_FIELD_CHARS = 4096


class TemplateError(ValueError):
    """A template description is invalid; the message says which field and how to fix it."""


def format_fields(pattern: str) -> list[str]:
    """The replacement fields of a ``str.format`` pattern, each of which must be a plain ``{name}``.

    Conversions (``{query!r}``), format specs (``{query:>1000000000}``, which would allocate a
    gigabyte), attribute and index access (``{query.__class__}``, ``{query[0]}``) are refused with
    a :class:`ValueError`: a pattern read from a bundle must only paste values in.
    """
    fields = []
    for _, name, spec, conversion in string.Formatter().parse(pattern):
        if name is None:
            continue
        if not name.isidentifier() or spec or conversion:
            field_text = name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "")
            raise ValueError(f"only plain {{name}} fields are allowed, not {{{field_text[:60]}}}")
        fields.append(name)
    return fields


def is_text_part(part: Any) -> bool:
    """A content part that carries text: a string, or ``{"type": "text", "text": ...}``."""
    return isinstance(part, str) or (isinstance(part, dict) and part.get("type") == "text"
                                     and isinstance(part.get("text"), str))


def content_text(content: Any) -> str:
    """The text of a message's content: the string itself, or its text parts joined (other parts ignored),
    the way LangChain's ``BaseMessage.text`` reads it."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(part if isinstance(part, str) else part["text"] for part in content if is_text_part(part))
    return ""


def append_text(content: str | list[Any], text: str) -> str | list[Any]:
    """``content`` with ``text`` added at the end (as a new text part for multimodal content)."""
    return content + text if isinstance(content, str) else [*content, {"type": "text", "text": text}]


@dataclass(frozen=True)
class Demo:
    """One few-shot demonstration: a query and its answer as the target should write it."""

    query: str
    answer: str


@dataclass(frozen=True)
class Rendered:
    """The rendered input: chat ``messages`` and the user turn as ``text``."""

    messages: list[dict[str, str]] = field(default_factory=list)
    text: str = ""


@dataclass(frozen=True)
class Template:
    """Where the prompt goes relative to the query.

    * ``before``: ``prompt + separator + query`` in the user turn (an instruction);
    * ``after``: ``query + separator + prompt`` in the user turn (a suffix);
    * ``system``: the prompt is the system message, the user turn is the query.

    Demonstrations (few-shot) come before the query in the user turn, each as
    ``demo_format`` joined by ``demo_separator``.
    """

    placement: Placement = "before"
    separator: str = "\n\n"
    demo_format: str = "{query}\nAnswer: {answer}"
    demo_separator: str = "\n\n"

    def __post_init__(self) -> None:
        if not isinstance(self.placement, str) or self.placement not in PLACEMENTS:
            raise TemplateError(
                f"Template placement must be one of {', '.join(PLACEMENTS)}; got {brief_repr(self.placement)}."
            )
        for name in ("separator", "demo_format", "demo_separator"):
            value = getattr(self, name)
            if not isinstance(value, str):
                raise TemplateError(f"Template field {name!r} must be a string; got {type(value).__name__}.")
            if len(value) > _MAX_FIELD_CHARS:
                raise TemplateError(f"Template field {name!r} is longer than {_MAX_FIELD_CHARS} characters.")
        try:
            unknown = set(format_fields(self.demo_format)) - {"query", "answer"}
            if unknown:
                raise ValueError(f"unknown field(s) {sorted(unknown)}")
        except ValueError as exc:
            raise TemplateError(
                "Template demo_format may only use the plain fields {query} and {answer} "
                f"(escape literal braces as {{{{ }}}}); got {brief_repr(self.demo_format)}: {exc}"
            ) from exc

    def user_text(self, prompt: str, query: str, demos: Sequence[Demo] = ()) -> str:
        """The user turn: demonstrations, then the query, with the prompt per ``placement``."""
        body = query
        if demos:
            shots = self.demo_separator.join(self.demo_format.format(query=d.query, answer=d.answer) for d in demos)
            body = shots + self.demo_separator + query
        if not prompt or self.placement == "system":
            return body
        if self.placement == "before":
            return prompt + self.separator + body
        return body + self.separator + prompt

    def add_prompt(self, content: str | list[Any], prompt: str) -> str | list[Any]:
        """A user turn's content (a string, or a list of content parts) with the prompt added per ``placement``
        ``"before"``/``"after"``; the query text and every other part stay as they are.

        Multimodal content gets the prompt as its own text part, before the first text part or after
        the last one. The LangChain integration and the OpenAI-compatible proxy both place prompts here.
        """
        if isinstance(content, str):
            return self.user_text(prompt, content)
        blocks = list(content)
        texts = [i for i, block in enumerate(blocks) if is_text_part(block)] or [len(blocks)]
        if self.placement == "after":
            blocks.insert(texts[-1] + 1, {"type": "text", "text": self.separator + prompt})
        else:
            blocks.insert(texts[0], {"type": "text", "text": prompt + self.separator})
        return blocks

    def render(self, prompt: str, query: str, demos: Sequence[Demo] = ()) -> Rendered:
        """Render into chat messages plus the user-turn text; ``query`` is kept verbatim."""
        text = self.user_text(prompt, query, demos)
        messages: list[dict[str, str]] = []
        if prompt and self.placement == "system":
            messages.append({"role": "system", "content": prompt})
        messages.append({"role": "user", "content": text})
        return Rendered(messages=messages, text=text)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Template:
        """Build from a manifest/config mapping; unknown keys are an error (they signal a newer format)."""
        if not isinstance(data, Mapping):
            raise TemplateError(f"A template must be a JSON object; got {type(data).__name__}.")
        known = {"placement", "separator", "demo_format", "demo_separator"}
        unknown = set(data) - known
        if unknown:
            raise TemplateError(
                f"Unknown template field(s) {brief_repr(sorted(map(str, unknown)))}; known: {sorted(known)}. "
                "Upgrade qpo-middleware if the bundle was made by a newer version."
            )
        return cls(**dict(data))
