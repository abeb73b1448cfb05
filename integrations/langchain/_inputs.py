"""Chat-model inputs as the rewriter sees them: the query text in each, and how to put a prompt back.

:func:`parse_input` reads one input (a string, a ``PromptValue``, a list of messages, or a
dict holding one of those under ``input_key``) into a :class:`Slot`; ``Slot.rebuild`` gives
the same kind of input with the policy's prompt placed per the bundle's template. The query
text itself is never altered or dropped.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeAlias

from langchain_core.language_models import LanguageModelInput
from langchain_core.messages import BaseMessage, HumanMessage, SystemMessage, convert_to_messages
from langchain_core.prompt_values import ChatPromptValue, PromptValue, StringPromptValue

from qpo_middleware.template import Template, append_text

__all__ = ["QPOInput", "Slot", "parse_input"]

QPOInput: TypeAlias = LanguageModelInput | dict[str, Any]
"""What the rewriter takes and gives: chat-model input, or a dict holding it under ``input_key``."""


@dataclasses.dataclass(frozen=True)
class Slot:
    """One input: the text the policy sees (``None``: nothing to rewrite) and how to put a prompt back."""

    original: Any
    query: str | None
    rebuild: Callable[[str], Any]


def _text_slot(original: Any, text: str, template: Template, wrap: Callable[[str], Any]) -> Slot:
    def rebuild(prompt: str) -> Any:
        if template.placement == "system":
            # A plain string has no system slot: the result becomes a chat prompt.
            return ChatPromptValue(messages=[SystemMessage(content=prompt), HumanMessage(content=text)])
        return wrap(template.user_text(prompt, text))

    return Slot(original, text if text.strip() else None, rebuild)


def _messages_slot(
    original: Any, messages: list[BaseMessage], template: Template, wrap: Callable[[list[BaseMessage]], Any]
) -> Slot:
    index = next((i for i in reversed(range(len(messages))) if isinstance(messages[i], HumanMessage)), None)
    if index is None:
        return Slot(original, None, lambda prompt: original)
    human = messages[index]
    query = human.text

    def rebuild(prompt: str) -> Any:
        out = list(messages)
        if template.placement == "system":
            first = out[0]
            if isinstance(first, SystemMessage):
                # Keep the caller's system text; the policy's prompt follows it.
                content = append_text(first.content, template.separator + prompt)
                out[0] = first.model_copy(update={"content": content})
            else:
                out.insert(0, SystemMessage(content=prompt))
        else:
            out[index] = human.model_copy(update={"content": template.add_prompt(human.content, prompt)})
        return wrap(out)

    return Slot(original, query if query.strip() else None, rebuild)


def _value_slot(value: Any, template: Template, where: str) -> Slot:
    if isinstance(value, str):
        return _text_slot(value, value, template, lambda text: text)
    if isinstance(value, StringPromptValue):
        return _text_slot(value, value.text, template, lambda text: StringPromptValue(text=text))
    if isinstance(value, PromptValue):
        return _messages_slot(
            value, value.to_messages(), template, lambda messages: ChatPromptValue(messages=messages)
        )
    if isinstance(value, Sequence) and not isinstance(value, bytes):
        try:
            messages = convert_to_messages(value)
        except Exception as exc:
            raise TypeError(
                f"QPORewriter: {where} is a sequence but not a list of chat messages ({exc}). Pass "
                "BaseMessage objects, (role, content) tuples or {'role': ..., 'content': ...} dicts."
            ) from exc
        return _messages_slot(value, messages, template, lambda messages: messages)
    raise TypeError(
        f"QPORewriter takes a str, a PromptValue, a list of messages, or a dict holding one of those under "
        f"input_key; {where} is a {type(value).__name__}."
    )


def parse_input(value: Any, template: Template, input_key: str) -> Slot:
    """The :class:`Slot` of one rewriter input; ``TypeError``/``ValueError`` for what is not chat-model input."""
    if isinstance(value, Mapping):
        if input_key not in value:
            raise ValueError(
                f"QPORewriter got a dict without the key {input_key!r} (keys: {sorted(map(str, value))}); "
                "set input_key= to the key that holds the query."
            )
        inner = _value_slot(value[input_key], template, f"input[{input_key!r}]")
        return Slot(value, inner.query, lambda prompt: {**value, input_key: inner.rebuild(prompt)})
    return _value_slot(value, template, "the input")
