"""A deterministic LangChain chat model for target-plumbing tests (a stand-in for a paid API).

It answers "positive" when the review has an even number of words, else "negative";
it fails the first ``fail_first`` calls for every input and always fails on inputs
containing "ALWAYS_FAIL". Importable as ``_flaky_chat:make`` for `module:factory` targets.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from langchain_core.language_models.chat_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatResult


class FlakyChat(BaseChatModel):
    fail_first: int = 0
    calls: Counter = Counter()  # noqa: RUF012 - shared per instance via model_post_init

    def model_post_init(self, context: Any) -> None:  # noqa: ARG002
        self.calls = Counter()

    @property
    def _llm_type(self) -> str:
        return "flaky-test-chat"

    def _generate(self, messages: list[BaseMessage], stop: Any = None, run_manager: Any = None, **kwargs: Any) -> ChatResult:
        text = str(messages[-1].content)
        self.calls[text] += 1
        if "ALWAYS_FAIL" in text or self.calls[text] <= self.fail_first:
            raise TimeoutError("simulated provider timeout")
        review = text.rsplit("\n\n", 1)[-1]
        answer = "positive" if len(review.split()) % 2 == 0 else "negative"
        return ChatResult(generations=[ChatGeneration(message=AIMessage(content=f"The sentiment is {answer}."))])


def make() -> FlakyChat:
    return FlakyChat()
