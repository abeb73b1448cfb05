"""QPORewriter, with_qpo and QPOChatModel on a tiny exported bundle, with fake chat models for the plumbing."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _langchain_helpers import (
    EchoChatModel,
    EventRecorder,
    RunRecorder,
    ToolEchoChatModel,
    tiny_bundle,
    transcript,
)
from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompt_values import ChatPromptValue, StringPromptValue
from langchain_core.prompts import ChatPromptTemplate, PromptTemplate
from langchain_core.runnables import RunnableBinding
from pydantic import BaseModel, ValidationError

from qpo_middleware import PromptOptimizer, RuntimeConfig, Status, runtime
from qpo_middleware.integrations.langchain import (
    QPO_EVENT,
    LatencyBudgetExceeded,
    QPOChatModel,
    QPORewriter,
    with_qpo,
)

QUERY = "Is this movie any good?"
QUERIES = [QUERY, "Quiet, moving, and honest.", "The plot drags but the cast is superb."]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_bundle(tmp_path_factory)


@pytest.fixture(scope="module")
def prompts(optimizer: PromptOptimizer) -> dict[str, str]:
    """The policy's greedy prompt for each test query (non-empty, so every rewrite is visible)."""
    result = {q: optimizer.optimize(q).prompt for q in QUERIES}
    assert all(result.values()), result
    return result


@pytest.fixture
def rewriter(optimizer: PromptOptimizer) -> QPORewriter:
    return QPORewriter(optimizer=optimizer)


@pytest.fixture
def spy(optimizer: PromptOptimizer, monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """Records the queries of every optimize_batch call (the real decode still runs)."""
    calls: list[list[str]] = []
    real = optimizer.optimize_batch

    def recording(queries: Any, **kwargs: Any) -> Any:
        calls.append(list(queries))
        return real(queries, **kwargs)

    monkeypatch.setattr(optimizer, "optimize_batch", recording)
    return calls


def _slow(optimizer: PromptOptimizer, monkeypatch: pytest.MonkeyPatch, seconds: float) -> None:
    real = optimizer.optimize_batch

    def slow(queries: Any, **kwargs: Any) -> Any:
        time.sleep(seconds)
        return real(queries, **kwargs)

    monkeypatch.setattr(optimizer, "optimize_batch", slow)


def _broken(optimizer: PromptOptimizer, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(queries: Any, **kwargs: Any) -> Any:
        raise RuntimeError("policy exploded")

    monkeypatch.setattr(optimizer, "optimize_batch", broken)


# ---------------------------------------------------------------------------- input kinds


def test_string_gets_prompt_before_query_verbatim(rewriter: QPORewriter, prompts: dict[str, str]) -> None:
    out = rewriter.invoke(QUERY)
    assert isinstance(out, str)
    assert out == prompts[QUERY] + "\n\n" + QUERY
    assert rewriter.bundle_id.startswith("sst2-") and len(rewriter.bundle_id) == len("sst2-") + 12


def test_rendering_matches_the_runtime_template(rewriter: QPORewriter, optimizer: PromptOptimizer) -> None:
    for query in QUERIES:
        assert rewriter.invoke(query) == optimizer.optimize(query).text


def test_string_prompt_value(rewriter: QPORewriter, prompts: dict[str, str]) -> None:
    value = PromptTemplate.from_template("{q}").invoke({"q": QUERY})
    out = rewriter.invoke(value)
    assert isinstance(out, StringPromptValue)
    assert out.text == prompts[QUERY] + "\n\n" + QUERY


def test_chat_prompt_value_rewrites_last_human_message(
    rewriter: QPORewriter, prompts: dict[str, str]
) -> None:
    template = ChatPromptTemplate.from_messages(
        [("system", "You are a film critic."), ("human", "hello"), ("ai", "hi"), ("human", "{q}")]
    )
    value = template.invoke({"q": QUERY})
    out = rewriter.invoke(value)
    assert isinstance(out, ChatPromptValue)
    before, after = value.to_messages(), out.to_messages()
    assert after[:3] == before[:3]
    assert isinstance(after[3], HumanMessage)
    assert after[3].content == prompts[QUERY] + "\n\n" + QUERY


def test_message_list_keeps_everything_but_the_last_human_turn(
    rewriter: QPORewriter, prompts: dict[str, str]
) -> None:
    messages: list[BaseMessage] = [
        SystemMessage(content="Be brief."),
        HumanMessage(content="earlier question", id="h1"),
        AIMessage(content="earlier answer"),
        HumanMessage(content=QUERY, id="h2", additional_kwargs={"x": 1}),
    ]
    out = rewriter.invoke(messages)
    assert isinstance(out, list) and len(out) == 4
    assert out[:3] == messages[:3]
    assert out[3].content == prompts[QUERY] + "\n\n" + QUERY
    assert (out[3].id, out[3].additional_kwargs) == ("h2", {"x": 1})
    assert messages[3].content == QUERY  # the input is not mutated


def test_message_likes_are_accepted(rewriter: QPORewriter, prompts: dict[str, str]) -> None:
    out = rewriter.invoke([("system", "Be brief."), {"role": "user", "content": QUERY}])
    assert [type(m) for m in out] == [SystemMessage, HumanMessage]
    assert out[1].content == prompts[QUERY] + "\n\n" + QUERY


def test_dict_input_rewrites_input_key_only(optimizer: PromptOptimizer, prompts: dict[str, str]) -> None:
    out = QPORewriter(optimizer=optimizer).invoke({"input": QUERY, "lang": "en"})
    assert out == {"input": prompts[QUERY] + "\n\n" + QUERY, "lang": "en"}
    custom = QPORewriter(optimizer=optimizer, input_key="question")
    out = custom.invoke({"question": [HumanMessage(content=QUERY)], "input": "untouched"})
    assert out["input"] == "untouched"
    assert out["question"][0].content == prompts[QUERY] + "\n\n" + QUERY
    with pytest.raises(ValueError, match="input_key"):
        custom.invoke({"input": QUERY})


def test_multimodal_content_keeps_other_blocks(rewriter: QPORewriter, prompts: dict[str, str]) -> None:
    image = {"type": "image", "url": "https://example.com/poster.png"}
    message = HumanMessage(content=[{"type": "text", "text": QUERY}, image])
    (out,) = rewriter.invoke([message])
    assert out.content == [
        {"type": "text", "text": prompts[QUERY] + "\n\n"},
        {"type": "text", "text": QUERY},
        image,
    ]


def test_placement_after(optimizer: PromptOptimizer, prompts: dict[str, str]) -> None:
    out = QPORewriter(optimizer=optimizer, placement="after").invoke(QUERY)
    assert out == QUERY + "\n\n" + prompts[QUERY]


def test_system_placement(optimizer: PromptOptimizer, prompts: dict[str, str]) -> None:
    rewriter = QPORewriter(optimizer=optimizer, placement="system")
    prompt = prompts[QUERY]
    # A message list without a system message gets one; the human turn stays verbatim.
    out = rewriter.invoke([HumanMessage(content=QUERY)])
    assert out == [SystemMessage(content=prompt), HumanMessage(content=QUERY)]
    # An existing system message keeps its text; the prompt follows it.
    out = rewriter.invoke([SystemMessage(content="Be brief."), HumanMessage(content=QUERY)])
    assert out[0].content == "Be brief.\n\n" + prompt and out[1].content == QUERY
    # A string has no system slot: it becomes a chat prompt.
    value = rewriter.invoke(QUERY)
    assert isinstance(value, ChatPromptValue)
    assert value.to_messages() == [SystemMessage(content=prompt), HumanMessage(content=QUERY)]


def test_nothing_to_rewrite_passes_through_without_a_decode(
    rewriter: QPORewriter, spy: list[list[str]]
) -> None:
    only_ai = [SystemMessage(content="s"), AIMessage(content="a")]
    assert rewriter.invoke(only_ai) == only_ai
    assert rewriter.invoke("   ") == "   "
    assert rewriter.batch(["", only_ai]) == ["", only_ai]
    assert spy == []
    assert rewriter.stats == {"queries": 4, "skipped": 4}


def test_unsupported_input_says_what_is_accepted(rewriter: QPORewriter) -> None:
    with pytest.raises(TypeError, match="str, a PromptValue, a list of messages"):
        rewriter.invoke(42)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="list of chat messages"):
        rewriter.invoke([object()])  # type: ignore[list-item]


def test_construction_needs_a_policy(bundle: Path) -> None:
    with pytest.raises(ValidationError, match="qpo export"):
        QPORewriter()
    with pytest.raises(ValidationError):
        QPORewriter(bundle=bundle, latency_budget_ms=0)
    loaded = QPORewriter(bundle=str(bundle))
    assert loaded.optimizer is not None and loaded.bundle_id.startswith("sst2-")


# ---------------------------------------------------------------------------- batch and async


def _mixed_inputs() -> list[Any]:
    return [
        QUERIES[0],
        [SystemMessage(content="Be brief."), HumanMessage(content=QUERIES[1])],
        {"input": QUERIES[2], "k": 1},
        ChatPromptTemplate.from_messages([("human", "{q}")]).invoke({"q": QUERIES[0]}),
        "",
    ]


def test_batch_is_one_batched_decode_equal_to_invoke(rewriter: QPORewriter, spy: list[list[str]]) -> None:
    inputs = _mixed_inputs()
    batched = rewriter.batch(inputs)
    assert spy == [[QUERIES[0], QUERIES[1], QUERIES[2], QUERIES[0]]]  # one call, empty query skipped
    spy.clear()
    assert batched == [rewriter.invoke(x) for x in inputs]
    assert len(spy) == 4


def test_batch_return_exceptions_fails_only_the_bad_row(
    rewriter: QPORewriter, prompts: dict[str, str]
) -> None:
    out = rewriter.batch([QUERY, 42], return_exceptions=True)  # type: ignore[list-item]
    assert out[0] == prompts[QUERY] + "\n\n" + QUERY
    assert isinstance(out[1], TypeError)
    with pytest.raises(TypeError):
        rewriter.batch([QUERY, 42])  # type: ignore[list-item]


@pytest.mark.asyncio
async def test_async_equals_sync(rewriter: QPORewriter, spy: list[list[str]]) -> None:
    inputs = _mixed_inputs()
    assert await rewriter.abatch(inputs) == rewriter.batch(inputs)
    assert len(spy) == 2  # abatch: one batched decode too
    assert [await rewriter.ainvoke(x) for x in inputs] == rewriter.batch(inputs)


@pytest.mark.asyncio
async def test_async_decode_does_not_block_the_event_loop(
    rewriter: QPORewriter,
    optimizer: PromptOptimizer,
    monkeypatch: pytest.MonkeyPatch,
    prompts: dict[str, str],
) -> None:
    _slow(optimizer, monkeypatch, 0.4)
    ticks = 0
    stop = asyncio.Event()

    async def ticker() -> None:
        nonlocal ticks
        while not stop.is_set():
            ticks += 1
            await asyncio.sleep(0.01)

    task = asyncio.create_task(ticker())
    out = await rewriter.ainvoke(QUERY)
    stop.set()
    await task
    assert out == prompts[QUERY] + "\n\n" + QUERY
    assert ticks >= 10  # the loop kept running during the 0.4 s decode


# ---------------------------------------------------------------------------- callbacks and tracing


def test_run_metadata_and_custom_event_hold_the_prompt(
    rewriter: QPORewriter, prompts: dict[str, str]
) -> None:
    tracer, events = RunRecorder(), EventRecorder()
    rewriter.invoke(QUERY, {"callbacks": [tracer, events], "metadata": {"user": "u1"}})
    (run,) = tracer.named("QPORewriter")
    assert run.run_type == "prompt"
    meta = run.extra["metadata"]
    assert meta["qpo_prompt"] == prompts[QUERY]
    assert meta["qpo_bundle_id"] == rewriter.bundle_id
    assert meta["qpo_status"] == "rewritten" and meta["qpo_latency_ms"] > 0 and meta["qpo_tokens"] > 0
    assert meta["user"] == "u1"
    assert run.outputs == {"output": prompts[QUERY] + "\n\n" + QUERY}
    # A plain handler sees the bundle id at start and the rest as a custom event of this run.
    assert events.start_metadata[0]["qpo_bundle_id"] == rewriter.bundle_id
    ((name, data, run_id),) = events.events
    assert (name, run_id) == (QPO_EVENT, run.id)
    assert data["qpo_prompt"] == prompts[QUERY]


def test_batch_gives_one_run_per_input(rewriter: QPORewriter, prompts: dict[str, str]) -> None:
    tracer = RunRecorder()
    rewriter.batch(QUERIES, {"callbacks": [tracer]})
    runs = tracer.named("QPORewriter")
    assert sorted(r.extra["metadata"]["qpo_prompt"] for r in runs) == sorted(prompts.values())
    for run in runs:
        assert run.outputs["output"].startswith(run.extra["metadata"]["qpo_prompt"])


@pytest.mark.asyncio
async def test_astream_events_show_the_prompt(optimizer: PromptOptimizer, prompts: dict[str, str]) -> None:
    chain = with_qpo(EchoChatModel(), optimizer)
    ends = [
        event
        async for event in chain.astream_events(QUERY, version="v2")
        if event["name"] == "QPORewriter" and event["event"].endswith("_end")
    ]
    assert ends and ends[0]["metadata"]["qpo_prompt"] == prompts[QUERY]


# ---------------------------------------------------------------------------- fail-open / fail-closed


def test_policy_error_fails_open(
    optimizer: PromptOptimizer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    _broken(optimizer, monkeypatch)
    rewriter = QPORewriter(optimizer=optimizer)
    tracer = RunRecorder()
    messages = [HumanMessage(content=QUERY)]
    with caplog.at_level(logging.WARNING, logger="qpo_middleware.integrations.langchain"):
        assert rewriter.invoke(messages, {"callbacks": [tracer]}) == messages
        assert rewriter.batch([QUERY, {"input": QUERY}]) == [QUERY, {"input": QUERY}]
    meta = tracer.named("QPORewriter")[0].extra["metadata"]
    assert meta["qpo_status"] == "error" and "policy exploded" in meta["qpo_error"]
    assert meta["qpo_prompt"] == ""
    assert rewriter.stats == {"queries": 3, "error": 3, "passed_through": 3}
    assert "failed open" in caplog.text


@pytest.mark.asyncio
async def test_policy_error_fails_open_async(
    optimizer: PromptOptimizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    _broken(optimizer, monkeypatch)
    rewriter = QPORewriter(optimizer=optimizer)
    assert await rewriter.ainvoke(QUERY) == QUERY
    assert await rewriter.abatch([QUERY, QUERY]) == [QUERY, QUERY]


def test_policy_error_fails_closed(optimizer: PromptOptimizer, monkeypatch: pytest.MonkeyPatch) -> None:
    _broken(optimizer, monkeypatch)
    rewriter = QPORewriter(optimizer=optimizer, fail_open=False)
    tracer = RunRecorder()
    with pytest.raises(RuntimeError, match="policy exploded"):
        rewriter.invoke(QUERY, {"callbacks": [tracer]})
    assert "policy exploded" in tracer.named("QPORewriter")[0].error
    with pytest.raises(RuntimeError, match="policy exploded"):
        rewriter.batch([QUERY, QUERY])
    out = rewriter.batch([QUERY], return_exceptions=True)
    assert isinstance(out[0], RuntimeError)


@pytest.mark.asyncio
async def test_policy_error_fails_closed_async(
    optimizer: PromptOptimizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    _broken(optimizer, monkeypatch)
    rewriter = QPORewriter(optimizer=optimizer, fail_open=False)
    with pytest.raises(RuntimeError, match="policy exploded"):
        await rewriter.ainvoke(QUERY)
    with pytest.raises(RuntimeError, match="policy exploded"):
        await rewriter.abatch([QUERY])


# ---------------------------------------------------------------------------- latency budget (the runtime's)


@pytest.fixture(params=["decode loop", "micro-batch wait"])
def overrunning(request: pytest.FixtureRequest, bundle: Path) -> Iterator[PromptOptimizer]:
    """An optimizer whose own config has a budget every call overruns, and fails open (the default).

    "decode loop": a 0 ms budget, noticed by the decode loop after the prefill. "micro-batch
    wait": a 1 ms budget and a 1 s batching window, noticed by the caller's wait for its
    micro-batch (which has not even started).
    """
    config = RuntimeConfig(provider="cpu", latency_budget_ms=0)
    if request.param == "micro-batch wait":
        config = config.with_(latency_budget_ms=1, batch_window_ms=1000)
    with PromptOptimizer.from_bundle(bundle, config=config) as optimizer:
        assert optimizer.config.fail_open
        yield optimizer


def test_fail_closed_raises_on_an_overrun_the_optimizer_would_fail_open(overrunning: PromptOptimizer) -> None:
    """fail_open=False raises whichever layer noticed the overrun, whatever the optimizer's own setting."""
    rewriter = QPORewriter(optimizer=overrunning, fail_open=False)
    tracer = RunRecorder()
    with pytest.raises(LatencyBudgetExceeded):
        rewriter.invoke(QUERY, {"callbacks": [tracer]})
    (run,) = tracer.named("QPORewriter")
    assert "LatencyBudgetExceeded" in run.error and run.extra["metadata"]["qpo_status"] == "timeout"
    with pytest.raises(LatencyBudgetExceeded):
        rewriter.batch([QUERY, QUERIES[1]])
    assert rewriter.stats == {"queries": 3, "timeout": 3}
    with pytest.raises(LatencyBudgetExceeded):
        QPOChatModel(model=EchoChatModel(), optimizer=overrunning, fail_open=False).invoke(QUERY)


@pytest.mark.asyncio
async def test_fail_closed_raises_on_an_overrun_async(overrunning: PromptOptimizer) -> None:
    rewriter = QPORewriter(optimizer=overrunning, fail_open=False)
    with pytest.raises(LatencyBudgetExceeded):
        await rewriter.ainvoke(QUERY)
    with pytest.raises(LatencyBudgetExceeded):
        await rewriter.abatch([QUERY, QUERIES[1]])
    with pytest.raises(LatencyBudgetExceeded):
        await QPOChatModel(model=EchoChatModel(), optimizer=overrunning, fail_open=False).ainvoke(QUERY)


def test_fail_open_overrun_passes_the_query_through_verbatim(overrunning: PromptOptimizer) -> None:
    rewriter = QPORewriter(optimizer=overrunning)
    tracer, events = RunRecorder(), EventRecorder()
    messages = [SystemMessage(content="Be brief."), HumanMessage(content=QUERY)]
    start = time.perf_counter()
    assert rewriter.invoke(QUERY, {"callbacks": [tracer, events]}) == QUERY
    assert rewriter.batch([QUERIES[1], messages]) == [QUERIES[1], messages]
    assert time.perf_counter() - start < 0.5  # no wait for the 1 s batching window
    meta = tracer.named("QPORewriter")[0].extra["metadata"]
    assert meta["qpo_status"] == Status.TIMEOUT and meta["qpo_prompt"] == "" and "qpo_error" not in meta
    assert events.events[0][1]["qpo_status"] == "timeout"
    assert rewriter.stats == {"queries": 3, "timeout": 3, "passed_through": 3}


@pytest.mark.asyncio
async def test_fail_open_overrun_async(overrunning: PromptOptimizer) -> None:
    rewriter = QPORewriter(optimizer=overrunning)
    assert await rewriter.ainvoke(QUERY) == QUERY
    assert await rewriter.abatch([QUERY, QUERIES[1]]) == [QUERY, QUERIES[1]]
    assert rewriter.stats == {"queries": 3, "timeout": 3, "passed_through": 3}


def test_rewriter_budget_goes_to_every_optimizer_call(
    optimizer: PromptOptimizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rewriter keeps no timer: its settings go with each call (async too), and the runtime enforces them."""
    seen: list[dict[str, Any]] = []
    real = optimizer.optimize_batch

    def recording(queries: Any, **kwargs: Any) -> Any:
        seen.append(kwargs)
        return real(queries, **kwargs)

    monkeypatch.setattr(optimizer, "optimize_batch", recording)
    rewriter = QPORewriter(optimizer=optimizer, latency_budget_ms=30_000, fail_open=False)
    rewriter.invoke(QUERY)
    asyncio.run(rewriter.ainvoke(QUERY))
    assert [(call["latency_budget_ms"], call["fail_open"]) for call in seen] == [(30_000, False)] * 2
    # A budget of 1 µs: the decode loop stops after the prefill.
    with pytest.raises(LatencyBudgetExceeded):
        QPORewriter(optimizer=optimizer, latency_budget_ms=1e-3, fail_open=False).invoke(QUERY)
    assert QPORewriter(optimizer=optimizer, latency_budget_ms=1e-3).invoke(QUERY) == QUERY
    assert LatencyBudgetExceeded is runtime.LatencyBudgetExceeded  # one exception type: the runtime's


def test_budget_met_rewrites(optimizer: PromptOptimizer, prompts: dict[str, str]) -> None:
    rewriter = QPORewriter(optimizer=optimizer, latency_budget_ms=30_000)
    assert rewriter.invoke(QUERY) == prompts[QUERY] + "\n\n" + QUERY
    assert rewriter.batch(QUERIES) == [prompts[q] + "\n\n" + q for q in QUERIES]


def test_rewriter_is_thread_safe(rewriter: QPORewriter, prompts: dict[str, str]) -> None:
    results: dict[int, Any] = {}

    def work(i: int) -> None:
        results[i] = rewriter.invoke(QUERIES[i % 3])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(results[i] == prompts[QUERIES[i % 3]] + "\n\n" + QUERIES[i % 3] for i in range(6))


# ---------------------------------------------------------------------------- with_qpo and chains


def test_lcel_chain(optimizer: PromptOptimizer, prompts: dict[str, str]) -> None:
    template = ChatPromptTemplate.from_messages([("system", "Answer in one word."), ("human", "{review}")])
    chain = template | QPORewriter(optimizer=optimizer) | EchoChatModel() | StrOutputParser()
    answer = chain.invoke({"review": QUERY})
    assert answer == f"system: Answer in one word.\nhuman: {prompts[QUERY]}\n\n{QUERY}"


def test_with_qpo_invoke_batch_and_stream(bundle: Path, prompts: dict[str, str]) -> None:
    chat = EchoChatModel()
    chain = with_qpo(chat, bundle)
    expected = f"human: {prompts[QUERY]}\n\n{QUERY}"
    assert chain.invoke(QUERY).content == expected
    assert [m.content for m in chain.batch(QUERIES)] == [f"human: {prompts[q]}\n\n{q}" for q in QUERIES]
    chunks = list(chain.stream(QUERY))
    assert len(chunks) > 3  # the chat model's own chunks, not one final message
    assert "".join(c.content for c in chunks) == expected


@pytest.mark.asyncio
async def test_with_qpo_async_and_astream(optimizer: PromptOptimizer, prompts: dict[str, str]) -> None:
    chain = with_qpo(EchoChatModel(), optimizer, placement="system")
    expected = f"system: {prompts[QUERY]}\nhuman: {QUERY}"
    assert (await chain.ainvoke(QUERY)).content == expected
    assert [m.content for m in await chain.abatch([QUERY, QUERY])] == [expected, expected]
    chunks = [chunk async for chunk in chain.astream(QUERY)]
    assert len(chunks) > 3 and "".join(c.content for c in chunks) == expected


def test_with_qpo_on_a_generic_fake_model(optimizer: PromptOptimizer) -> None:
    chat = GenericFakeChatModel(messages=iter(["a fine film", "a fine film"]))
    chain = with_qpo(chat, optimizer)
    assert chain.invoke(QUERY).content == "a fine film"
    assert "".join(c.content for c in chain.stream(QUERY)) == "a fine film"


# ---------------------------------------------------------------------------- QPOChatModel


def test_chat_model_rewrites_then_delegates(optimizer: PromptOptimizer, prompts: dict[str, str]) -> None:
    inner = EchoChatModel()
    chat = QPOChatModel(model=inner, optimizer=optimizer, stop=["###"])
    messages = [SystemMessage(content="Be brief."), HumanMessage(content=QUERY)]
    expected = transcript([messages[0], HumanMessage(content=prompts[QUERY] + "\n\n" + QUERY)])
    assert chat.invoke(messages).content == expected
    assert inner.calls[-1]["stop"] == ["###"]
    assert chat.invoke(messages, stop=["!"]).content == expected and inner.calls[-1]["stop"] == ["!"]
    assert "".join(c.content for c in chat.stream(messages)) == expected
    assert [m.content for m in chat.batch([messages, messages])] == [expected, expected]


@pytest.mark.asyncio
async def test_chat_model_async(optimizer: PromptOptimizer, prompts: dict[str, str]) -> None:
    chat = QPOChatModel(model=EchoChatModel(), optimizer=optimizer)
    expected = f"human: {prompts[QUERY]}\n\n{QUERY}"
    assert (await chat.ainvoke(QUERY)).content == expected
    chunks = [chunk async for chunk in chat.astream(QUERY)]
    assert len(chunks) > 3 and "".join(c.content for c in chunks) == expected


def test_chat_model_streams_from_a_model_that_cannot(optimizer: PromptOptimizer) -> None:
    chat = QPOChatModel(model=GenericFakeChatModel(messages=iter(["one two three"] * 3)), optimizer=optimizer)
    assert "".join(c.content for c in chat.stream(QUERY)) == "one two three"
    chat = QPOChatModel(model=EchoChatModel(), optimizer=optimizer, streaming=True)
    assert chat.invoke(QUERY).content.endswith(QUERY)


def test_chat_model_trace(optimizer: PromptOptimizer, prompts: dict[str, str]) -> None:
    chat = QPOChatModel(model=EchoChatModel(), optimizer=optimizer)
    tracer = RunRecorder()
    chat.invoke(QUERY, {"callbacks": [tracer]})
    (llm_run,) = [r for r in tracer.runs if r.run_type == "llm"]  # one chat-model run, not two
    (rewrite_run,) = tracer.named("QPORewriter")
    assert llm_run.name == "QPOChatModel" and rewrite_run.parent_run_id == llm_run.id
    assert rewrite_run.extra["metadata"]["qpo_prompt"] == prompts[QUERY]
    assert llm_run.extra["metadata"]["ls_model_name"] == "echo-chat"


def test_chat_model_streaming_paths_trace_the_rewrite(
    optimizer: PromptOptimizer, prompts: dict[str, str]
) -> None:
    # langchain-core 1.x calls _stream without a run manager; the rewrite is still traced.
    chat = QPOChatModel(model=EchoChatModel(), optimizer=optimizer)
    streaming = QPOChatModel(model=EchoChatModel(), optimizer=optimizer, streaming=True)
    calls = [
        lambda config: list(chat.stream(QUERY, config)),
        lambda config: streaming.invoke(QUERY, config),
        lambda config: asyncio.run(streaming.ainvoke(QUERY, config)),
        lambda config: asyncio.run(_collect(chat.astream(QUERY, config))),
    ]
    for call in calls:
        tracer = RunRecorder()
        call({"callbacks": [tracer], "run_name": "answer"})
        (rewrite,) = tracer.named("QPORewriter")
        assert rewrite.extra["metadata"]["qpo_prompt"] == prompts[QUERY]
        assert [r.name for r in tracer.runs if r.run_type == "llm"] == ["answer"]


async def _collect(stream: Any) -> list[Any]:
    return [chunk async for chunk in stream]


def test_chat_model_fail_closed(optimizer: PromptOptimizer, monkeypatch: pytest.MonkeyPatch) -> None:
    _broken(optimizer, monkeypatch)
    assert QPOChatModel(model=EchoChatModel(), optimizer=optimizer).invoke(QUERY).content == f"human: {QUERY}"
    with pytest.raises(RuntimeError, match="policy exploded"):
        QPOChatModel(model=EchoChatModel(), optimizer=optimizer, fail_open=False).invoke(QUERY)


class Review(BaseModel):
    """A review and its length."""

    text: str
    length: int


def test_chat_model_passes_tools_and_structured_output_through(
    optimizer: PromptOptimizer, prompts: dict[str, str]
) -> None:
    inner = ToolEchoChatModel()
    chat = QPOChatModel(model=inner, optimizer=optimizer)
    rewritten = prompts[QUERY] + "\n\n" + QUERY

    bound = chat.bind_tools([Review], tool_choice="any")
    assert isinstance(bound, RunnableBinding) and bound.bound is chat
    message = bound.invoke(QUERY)
    assert message.tool_calls[0]["name"] == "Review"
    assert message.tool_calls[0]["args"] == {"text": rewritten, "length": len(rewritten)}
    assert inner.calls[-1]["tool_choice"] == "any"

    review = chat.with_structured_output(Review).invoke(QUERY)
    assert review == Review(text=rewritten, length=len(rewritten))


def test_chat_model_without_tool_support_says_so(optimizer: PromptOptimizer) -> None:
    chat = QPOChatModel(model=EchoChatModel(), optimizer=optimizer)
    with pytest.raises(NotImplementedError):
        chat.bind_tools([Review])


# ---------------------------------------------------------------------------- torch-free


BLOCKED_RUN = textwrap.dedent(
    """
    import importlib.abc, sys

    class Blocker(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "transformers", "optimum"):
                raise ImportError(f"{name} is blocked in this test")
            return None

    sys.meta_path.insert(0, Blocker())
    from langchain_core.language_models.fake_chat_models import ParrotFakeChatModel
    from qpo_middleware.integrations.langchain import QPOChatModel, with_qpo

    print(with_qpo(ParrotFakeChatModel(), sys.argv[1]).invoke(sys.argv[2]).content)
    print(QPOChatModel(model=ParrotFakeChatModel(), bundle=sys.argv[1]).invoke(sys.argv[2]).content)
    print(sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "optimum")))
    """
)


def test_langchain_integration_is_torch_free(bundle: Path, prompts: dict[str, str]) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", BLOCKED_RUN, str(bundle), QUERY], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    expected = prompts[QUERY] + "\n\n" + QUERY
    assert proc.stdout.splitlines()[-1] == "[]"
    assert proc.stdout.count(expected) == 2
