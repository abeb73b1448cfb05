"""Shared pieces for the LangChain integration tests.

A tiny exported bundle (built once per test process), chat models that show what
they were sent, and handlers that keep finished runs and custom events.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from langchain_core.callbacks import BaseCallbackHandler, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LanguageModelInput
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.output_parsers.openai_tools import PydanticToolsParser
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable
from langchain_core.tools import BaseTool
from langchain_core.tracers.base import BaseTracer
from langchain_core.tracers.schemas import Run
from langchain_core.utils.function_calling import convert_to_openai_tool
from pydantic import Field

_BUNDLES: dict[str, Path] = {}


def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Export the tiny random Llama of ``_tiny.py`` once per process (about 10 s) and return the bundle dir."""
    if "tiny" not in _BUNDLES:
        from _tiny import build_checkpoint, export_tiny

        root = tmp_path_factory.mktemp("qpo_langchain")
        _BUNDLES["tiny"] = export_tiny(build_checkpoint(root / "checkpoint"), root / "bundle")
    return _BUNDLES["tiny"]


def transcript(messages: Sequence[BaseMessage]) -> str:
    """What :class:`EchoChatModel` answers: one ``role: text`` line per message."""
    return "\n".join(f"{m.type}: {m.text}" for m in messages)


class EchoChatModel(BaseChatModel):
    """Answers with the transcript it was sent; streams it in word-sized chunks; records call kwargs."""

    calls: list[dict[str, Any]] = Field(default_factory=list)

    @property
    def _llm_type(self) -> str:
        return "echo-chat"

    def _reply(self, messages: list[BaseMessage], kwargs: dict[str, Any]) -> AIMessage:
        self.calls.append({"messages": list(messages), **kwargs})
        return AIMessage(content=transcript(messages))

    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        return ChatResult(
            generations=[ChatGeneration(message=self._reply(messages, {"stop": stop, **kwargs}))]
        )

    def _stream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> Iterator[ChatGenerationChunk]:
        text = self._reply(messages, {"stop": stop, **kwargs}).text
        for piece in re.findall(r"\S+|\s+", text):
            yield ChatGenerationChunk(message=AIMessageChunk(content=piece))


class ToolEchoChatModel(EchoChatModel):
    """An echo model with tool calling: with tools bound it calls the first tool, filling
    string arguments with the last message's text and integer ones with its length."""

    @property
    def _llm_type(self) -> str:
        return "tool-echo-chat"

    def _reply(self, messages: list[BaseMessage], kwargs: dict[str, Any]) -> AIMessage:
        tools = kwargs.get("tools")
        if not tools:
            return super()._reply(messages, kwargs)
        self.calls.append({"messages": list(messages), **kwargs})
        function = tools[0]["function"]
        text = messages[-1].text
        properties = function.get("parameters", {}).get("properties", {})
        args = {k: len(text) if v.get("type") == "integer" else text for k, v in properties.items()}
        return AIMessage(content="", tool_calls=[{"name": function["name"], "args": args, "id": "call_0"}])

    def bind_tools(
        self,
        tools: Sequence[dict[str, Any] | type | Callable[..., Any] | BaseTool],
        *,
        tool_choice: str | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, AIMessage]:
        formatted = [convert_to_openai_tool(tool) for tool in tools]
        if tool_choice is not None:
            kwargs["tool_choice"] = tool_choice
        return self.bind(tools=formatted, **kwargs)

    def with_structured_output(
        self,
        schema: Any,
        *,
        include_raw: bool = False,
        method: str = "function_calling",
        strict: bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, Any]:
        return self.bind_tools([schema], tool_choice="any") | PydanticToolsParser(
            tools=[schema], first_tool_only=True
        )


class RunRecorder(BaseTracer):
    """Keeps every finished run (any depth), with its final metadata."""

    def __init__(self) -> None:
        super().__init__()
        self.runs: list[Run] = []

    def _persist_run(self, run: Run) -> None:
        pass

    def _end_trace(self, run: Run) -> None:
        self.runs.append(run)
        super()._end_trace(run)

    def named(self, name: str) -> list[Run]:
        return [run for run in self.runs if run.name == name]


class EventRecorder(BaseCallbackHandler):
    """Keeps custom events and chain-start metadata as a plain callback handler sees them."""

    def __init__(self) -> None:
        self.events: list[tuple[str, Any, UUID]] = []
        self.start_metadata: list[dict[str, Any]] = []

    def on_custom_event(self, name: str, data: Any, *, run_id: UUID, **kwargs: Any) -> None:
        self.events.append((name, data, run_id))

    def on_chain_start(self, serialized: Any, inputs: Any, *, metadata: Any = None, **kwargs: Any) -> None:
        self.start_metadata.append(dict(metadata or {}))
