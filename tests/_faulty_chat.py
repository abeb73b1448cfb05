"""A LangChain chat model that misbehaves on a seeded fraction of calls: the target fault tests' provider.

Each call draws its fate from ``(seed, input text, how many times this text was asked)``,
so a run is reproducible and the tests can predict every outcome with :meth:`FaultyChat.plan`:

* with probability ``fault_rate`` the call is faulty, of one kind drawn uniformly from
  :data:`KINDS`:

  - errors, which the target retries: ``timeout`` raises ``TimeoutError``, ``error`` raises
    ``ConnectionError``, ``rate_limit`` raises ``RuntimeError("HTTP 429 ...")``, and ``hang``
    sleeps ``hang_seconds`` before answering (a target with ``timeout_seconds`` gives up first);
  - garbage replies, which are answers (scored, as wrong): ``empty`` (""), ``unicode`` (random
    code points: lone surrogates, controls, private use, CJK, emoji), ``long`` (120,000
    characters) and ``wrong_label`` ("neutral", not a label of the task);

* an input whose own draw falls under ``sticky_rate`` times out on every call (a query the
  provider keeps choking on);
* otherwise, and whenever ``faults`` is False (the provider recovered), the answer is
  "The sentiment is positive." for a review with an even number of words, else "negative"
  (like ``_flaky_chat``).

``latency`` adds a delay to every call, and ``max_active`` records the most calls in progress
at once. ``log`` holds ``(text, kind, time.monotonic())`` for every call, in call order. Importable as
``_faulty_chat:make`` for `module:factory` targets; ``make`` reads ``$QPO_FAULT_SEED``,
``$QPO_FAULT_RATE``, ``$QPO_FAULT_STICKY`` and ``$QPO_FAULT_HANG``.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections import Counter
from typing import Any

from langchain_core.language_models.chat_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from pydantic import PrivateAttr

ERRORS = ("timeout", "error", "rate_limit", "hang")
GARBAGE = ("empty", "unicode", "long", "wrong_label")
KINDS = ERRORS + GARBAGE
STICKY = "sticky_timeout"

_CODE_POINT_RANGES = ((0x00, 0x1F), (0x80, 0x2FF), (0xD800, 0xDFFF), (0xE000, 0xF8FF), (0x4E00, 0x9FFF),
                      (0x1F300, 0x1FAFF), (0x200B, 0x202E))


def good_answer(text: str) -> str:
    review = text.rsplit("\n\n", 1)[-1]
    return "positive" if len(review.split()) % 2 == 0 else "negative"


def garbage(kind: str, rng: random.Random) -> str:
    if kind == "empty":
        return ""
    if kind == "unicode":
        return "".join(chr(rng.randint(*rng.choice(_CODE_POINT_RANGES))) for _ in range(40))
    if kind == "long":
        return "lorem ipsum " * 10_000
    if kind == "wrong_label":
        return "neutral"
    raise ValueError(kind)


class FaultyChat(BaseChatModel):
    seed: int = 0
    fault_rate: float = 0.3
    sticky_rate: float = 0.0
    hang_seconds: float = 3.0
    faults: bool = True
    always: str | None = None  # force this kind on every call (unit tests of one kind)
    latency: float = 0.0  # seconds every call takes
    log: list = []  # noqa: RUF012 - replaced per instance in model_post_init
    max_active: int = 0  # most calls in progress at once
    _lock: Any = PrivateAttr(default=None)
    _asked: Any = PrivateAttr(default=None)
    _active: int = PrivateAttr(default=0)

    def model_post_init(self, context: Any) -> None:  # noqa: ARG002
        self.log = []
        self._lock = threading.Lock()
        self._asked = Counter()

    @property
    def _llm_type(self) -> str:
        return "faulty-test-chat"

    def _rng(self, text: str, n: int) -> random.Random:
        return random.Random(f"{self.seed}|{text}|{n}")

    def plan(self, text: str, n: int) -> str:
        """The kind of the ``n``-th call (1-based) with this text: one of KINDS, STICKY or "ok"."""
        if not self.faults:
            return "ok"
        if self.always:
            return self.always
        if random.Random(f"{self.seed}|sticky|{text}").random() < self.sticky_rate:
            return STICKY
        rng = self._rng(text, n)
        return rng.choice(KINDS) if rng.random() < self.fault_rate else "ok"

    def asked(self, text: str) -> int:
        with self._lock:
            return self._asked[text]

    def _generate(self, messages: list[BaseMessage], stop: Any = None, run_manager: Any = None,
                  **kwargs: Any) -> ChatResult:
        text = str(messages[-1].content)
        with self._lock:
            self._asked[text] += 1
            n = self._asked[text]
            kind = self.plan(text, n)
            self.log.append((text, kind, time.monotonic()))
            self._active += 1
            self.max_active = max(self.max_active, self._active)
        try:
            if self.latency:
                time.sleep(self.latency)
            return self._reply(text, n, kind)
        finally:
            with self._lock:
                self._active -= 1

    def _reply(self, text: str, n: int, kind: str) -> ChatResult:
        if kind in ("timeout", STICKY):
            raise TimeoutError("simulated provider timeout")
        if kind == "error":
            raise ConnectionError("simulated connection reset by peer")
        if kind == "rate_limit":
            raise RuntimeError("simulated HTTP 429: rate limited")
        if kind == "hang":
            time.sleep(self.hang_seconds)
        reply = garbage(kind, self._rng(text, n)) if kind in GARBAGE else f"The sentiment is {good_answer(text)}."
        return ChatResult(generations=[ChatGeneration(message=AIMessage(content=reply))])


def make() -> FaultyChat:
    return FaultyChat(seed=int(os.environ.get("QPO_FAULT_SEED", "0")),
                      fault_rate=float(os.environ.get("QPO_FAULT_RATE", "0.3")),
                      sticky_rate=float(os.environ.get("QPO_FAULT_STICKY", "0.05")),
                      hang_seconds=float(os.environ.get("QPO_FAULT_HANG", "3")))
