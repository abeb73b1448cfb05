"""LangChain's standard unit tests for QPOChatModel, with sockets disabled as partner packages run them.

The wrapped model is a fake with tool calling and structured output, so the
tool/structured-output tests exercise the pass-through; the policy is the tiny bundle.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import pytest_socket
from _langchain_helpers import ToolEchoChatModel, tiny_bundle
from langchain_tests.unit_tests import ChatModelUnitTests

from qpo_middleware import PromptOptimizer
from qpo_middleware.integrations.langchain import QPOChatModel

_POLICY: dict[str, PromptOptimizer] = {}


@pytest.fixture(scope="module", autouse=True)
def _tiny_policy(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Load the policy once: chat_model_params is a property, so it reads this module-level slot."""
    _POLICY["optimizer"] = PromptOptimizer.from_bundle(tiny_bundle(tmp_path_factory), provider="cpu")


@pytest.fixture(autouse=True)
def _no_network() -> Iterator[None]:
    """Like ``pytest --disable-socket --allow-unix-socket`` (asyncio needs unix socket pairs), for this module only."""
    pytest_socket.disable_socket(allow_unix_socket=True)
    yield
    pytest_socket.enable_socket()


class TestQPOChatModelStandard(ChatModelUnitTests):
    @property
    def chat_model_class(self) -> type[QPOChatModel]:
        return QPOChatModel

    @property
    def chat_model_params(self) -> dict[str, Any]:
        return {"model": ToolEchoChatModel(), "optimizer": _POLICY["optimizer"]}


@pytest.mark.filterwarnings("ignore:A test tried to use socket")
def test_sockets_are_disabled() -> None:
    import socket

    with pytest.raises(pytest_socket.SocketBlockedError):
        socket.socket(socket.AF_INET, socket.SOCK_STREAM)
