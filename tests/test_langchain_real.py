"""End to end on real models: a real exported SmolLM2 policy bundle in front of SmolLM2 as the chat model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from _langchain_helpers import RunRecorder
from _real_bundle import export_smollm2_bundle

from qpo_middleware import PromptOptimizer

pytestmark = pytest.mark.real

QUERIES = [
    "a gripping , beautifully acted film that stays with you .",
    "the plot is thin and the jokes fall flat .",
]


@pytest.fixture(scope="session")
def smollm2_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("torch")
    return export_smollm2_bundle(tmp_path_factory.mktemp("smollm2_langchain"))


@pytest.fixture(scope="session")
def policy(smollm2_bundle: Path) -> PromptOptimizer:
    return PromptOptimizer.from_bundle(smollm2_bundle, provider="cpu")


@pytest.fixture(scope="session")
def smollm2_chat() -> Any:
    from qpo_middleware.training.chat import local_smollm2_chat

    return local_smollm2_chat(max_new_tokens=8)


@pytest.fixture(scope="session")
def expected_prompts(policy: PromptOptimizer) -> dict[str, str]:
    prompts = {q: policy.optimize(q).prompt for q in QUERIES}
    assert all(prompts.values()), f"the untrained SmolLM2 policy wrote an empty prompt: {prompts}"
    return prompts


def _prompts_of(tracer: RunRecorder) -> list[str]:
    return [run.extra["metadata"]["qpo_prompt"] for run in tracer.named("QPORewriter")]


def test_with_qpo_smollm2_sync_and_batch(
    smollm2_bundle: Path, smollm2_chat: Any, expected_prompts: dict[str, str]
) -> None:
    from qpo_middleware.integrations.langchain import with_qpo

    chain = with_qpo(smollm2_chat, smollm2_bundle)  # loads the bundle from its path
    tracer = RunRecorder()
    replies = [chain.invoke(q, {"callbacks": [tracer]}) for q in QUERIES]
    for reply in replies:
        assert isinstance(reply.content, str) and reply.content.strip()
    assert _prompts_of(tracer) == [expected_prompts[q] for q in QUERIES]
    for run, query in zip(tracer.named("QPORewriter"), QUERIES, strict=True):
        assert run.outputs["output"] == expected_prompts[query] + "\n\n" + query

    tracer = RunRecorder()
    batched = chain.batch(QUERIES, {"callbacks": [tracer]})
    assert sorted(_prompts_of(tracer)) == sorted(expected_prompts.values())
    assert [m.content for m in batched] == [m.content for m in replies]  # greedy: batch == invoke


@pytest.mark.asyncio
async def test_with_qpo_smollm2_async(
    policy: PromptOptimizer, smollm2_chat: Any, expected_prompts: dict[str, str]
) -> None:
    from qpo_middleware.integrations.langchain import with_qpo

    chain = with_qpo(smollm2_chat, policy, latency_budget_ms=60_000)
    tracer = RunRecorder()
    reply = await chain.ainvoke(QUERIES[0], {"callbacks": [tracer]})
    assert isinstance(reply.content, str) and reply.content.strip()
    assert _prompts_of(tracer) == [expected_prompts[QUERIES[0]]]

    tracer = RunRecorder()
    replies = await chain.abatch(QUERIES, {"callbacks": [tracer]})
    assert all(isinstance(m.content, str) and m.content.strip() for m in replies)
    assert sorted(_prompts_of(tracer)) == sorted(expected_prompts.values())

    chunks = [chunk.content async for chunk in chain.astream(QUERIES[1])]
    assert "".join(chunks).strip() == replies[1].content.strip()


def test_qpo_chat_model_smollm2_stream(
    policy: PromptOptimizer, smollm2_chat: Any, expected_prompts: dict[str, str]
) -> None:
    from qpo_middleware.integrations.langchain import QPOChatModel

    chat = QPOChatModel(model=smollm2_chat, optimizer=policy, placement="system")
    tracer = RunRecorder()
    chunks = [chunk.content for chunk in chat.stream(QUERIES[0], {"callbacks": [tracer]})]
    assert "".join(chunks).strip()
    assert _prompts_of(tracer) == [expected_prompts[QUERIES[0]]]


def test_500_concurrent_ainvoke_on_the_real_bundle(smollm2_bundle: Path) -> None:
    """Soak: 500 concurrent ainvoke calls through with_qpo on the real SmolLM2 policy (micro-batched).

    No call errors, every reply is paired with its own query (a unique tag per call), and every
    call got the policy's own greedy prompt. ``benchmarks/soak.py`` runs the same with memory figures.
    """
    import asyncio

    from _langchain_helpers import EchoChatModel

    from qpo_middleware import RuntimeConfig
    from qpo_middleware.integrations.langchain import QPORewriter

    base = [
        "a gripping , beautifully acted film that stays with you .",
        "the plot is thin and the jokes fall flat .",
        "an uneven but often funny look at growing up .",
        "nothing here is worth the price of a ticket .",
    ]
    queries = [f"[#{i}] {base[i % len(base)]}" for i in range(500)]
    config = RuntimeConfig(provider="cpu", batch_window_ms=2, max_batch_size=32, max_queue=1024)
    with PromptOptimizer.from_bundle(smollm2_bundle, config=config) as optimizer:
        rewriter = QPORewriter(optimizer=optimizer)
        chain = rewriter | EchoChatModel()

        async def main() -> list[Any]:
            return await asyncio.gather(*(chain.ainvoke(q) for q in queries), return_exceptions=True)

        replies = asyncio.run(main())
        errors = [r for r in replies if isinstance(r, BaseException)]
        assert not errors, errors[:3]
        for query, reply in zip(queries, replies, strict=True):
            text = str(reply.content)
            # Its own query (unique by its tag), verbatim, after the prompt the policy wrote for it.
            # (The untrained policy sometimes imitates the tag in its prompt: only the end counts.)
            assert text.startswith("human: ") and text.endswith("\n\n" + query)
            prompt = text[len("human: ") : -len(query)].strip()
            assert prompt and len(prompt) <= optimizer.manifest.generation.max_new_tokens * 32
        assert rewriter.stats["rewritten"] == 500 and rewriter.stats.get("passed_through", 0) == 0
        stats = optimizer.stats()
        assert stats["batched_queries"] == 500 and stats["batches"] <= 500 / 4  # decodes were shared
