"""``qpo serve``, the OpenAI-compatible proxy, as real processes on 127.0.0.1.

The upstream is ``_echo_upstream.py`` (it answers with the request it received, so every check compares
what the upstream got with what the client sent), or ``_smollm2_upstream.py`` for one real-model test.
Clients are the official ``openai`` package, ``langchain-openai``'s ``ChatOpenAI`` and httpx for bytes
the SDKs would not send.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from _servers import free_port, qpo_serve, upstream

openai = pytest.importorskip("openai")

QUERY = "Is this movie any good? It was long — but “worth it” 🎬"


@pytest.fixture(scope="module")
def echo(tmp_path_factory: pytest.TempPathFactory):
    context, url = upstream("_echo_upstream.py", tmp_path_factory.mktemp("echo") / "echo.log")
    with context:
        yield url


@pytest.fixture(scope="module")
def proxy(bundle: Path, echo: str, tmp_path_factory: pytest.TempPathFactory):
    """The proxy in front of the echo upstream, default settings; yields (base URL, its log file)."""
    log = tmp_path_factory.mktemp("proxy") / "proxy.log"
    context, url = qpo_serve(bundle, echo, log)
    with context:
        yield url, log


def client(base_url: str, key: str = "sk-caller") -> Any:
    return openai.OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=30)


def received(response: Any) -> dict[str, Any]:
    """What the echo upstream received: {"body": ..., "headers": ...}."""
    return json.loads(response.choices[0].message.content)


def expected_prompt(optimizer: Any, query: str) -> str:
    return optimizer.optimize(query).prompt


def test_rewrites_the_last_user_message_and_forwards_everything_else(proxy, optimizer) -> None:
    base, _ = proxy
    tools = [{"type": "function", "function": {"name": "lookup", "description": "Look a film up.",
                                               "parameters": {"type": "object", "properties": {"title": {"type": "string"}}}}}]
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Earlier question"},
        {"role": "assistant", "content": None,
         "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": "{\"title\": \"x\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "x (2001)"},
        {"role": "user", "content": QUERY},
    ]
    raw = client(base).chat.completions.with_raw_response.create(
        model="echo", messages=messages, tools=tools, tool_choice="auto", temperature=0.3, top_p=0.9, n=2,
        max_tokens=7, stop=["\n\n"], seed=5, response_format={"type": "json_object"}, user="u-1",
        extra_body={"custom_field": {"kept": True}})
    response = raw.parse()
    got = received(response)
    prompt = expected_prompt(optimizer, QUERY)
    assert prompt and raw.headers["x-qpo-status"] == "rewritten" and float(raw.headers["x-qpo-latency-ms"]) >= 0
    assert got["body"]["messages"][:4] == messages[:4]  # system, earlier turns and tool calls untouched
    rewritten = got["body"]["messages"][4]
    assert rewritten == {"role": "user", "content": optimizer.template.user_text(prompt, QUERY)}
    assert QUERY in rewritten["content"]
    sent = {k: v for k, v in got["body"].items() if k != "messages"}
    assert sent == {"model": "echo", "tools": tools, "tool_choice": "auto", "temperature": 0.3, "top_p": 0.9, "n": 2,
                    "max_tokens": 7, "stop": ["\n\n"], "seed": 5, "response_format": {"type": "json_object"},
                    "user": "u-1", "custom_field": {"kept": True}}
    assert got["headers"]["authorization"] == "Bearer sk-caller"  # the caller's key is forwarded
    assert raw.headers.get("x-upstream") == "echo"  # upstream response headers are relayed


def test_streaming_is_relayed_chunk_by_chunk_as_it_arrives(proxy, optimizer) -> None:
    base, _ = proxy
    start, arrivals, text = time.monotonic(), [], []
    stream = client(base).chat.completions.create(model="slow-stream", messages=[{"role": "user", "content": QUERY}],
                                                  stream=True, stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            arrivals.append(time.monotonic() - start)
            text.append(chunk.choices[0].delta.content)
    got = json.loads("".join(text))
    assert got["body"]["stream_options"] == {"include_usage": True}
    assert got["body"]["messages"][0]["content"] == optimizer.template.user_text(expected_prompt(optimizer, QUERY), QUERY)
    # The upstream spaces 6 chunks 0.4 s apart: a relay that buffered would deliver them together at the end.
    assert len(arrivals) == 6 and arrivals[-1] - arrivals[0] > 1.5


def test_images_and_other_parts_stay_and_the_prompt_is_its_own_text_part(proxy, optimizer) -> None:
    base, _ = proxy
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
    content = [{"type": "text", "text": QUERY}, image]
    got = received(client(base).chat.completions.create(model="echo", messages=[{"role": "user", "content": content}]))
    prompt = expected_prompt(optimizer, QUERY)
    assert got["body"]["messages"][0]["content"] == optimizer.template.add_prompt(content, prompt)
    assert image in got["body"]["messages"][0]["content"] and {"type": "text", "text": QUERY} in got["body"]["messages"][0]["content"]


def test_requests_without_user_text_or_with_the_skip_header_pass_through_untouched(proxy) -> None:
    base, _ = proxy
    for messages, headers, status in (
        ([{"role": "system", "content": "Only a system message."}], {}, "skipped"),
        ([{"role": "user", "content": "   "}], {}, "skipped"),
        ([{"role": "user", "content": QUERY}], {"x-qpo-skip": "1"}, "passthrough"),
    ):
        body = {"model": "echo", "messages": messages, "temperature": 0}
        reply = httpx.post(f"{base}/chat/completions", json=body, headers=headers, timeout=30)
        assert reply.status_code == 200 and reply.headers["x-qpo-status"] == status
        got = json.loads(reply.json()["choices"][0]["message"]["content"])
        assert got["body"] == body and "x-qpo-skip" not in got["headers"]


def test_models_health_and_metrics(proxy) -> None:
    base, _ = proxy
    assert [m.id for m in client(base).models.list()] == ["echo"]
    root = base.removesuffix("/v1")
    health = httpx.get(f"{root}/healthz").json()
    assert health["status"] == "ready" and health["bundle"]
    metrics = httpx.get(f"{root}/metrics").text
    assert 'qpo_proxy_rewrites_total{status="rewritten"}' in metrics
    assert "qpo_proxy_rewrite_seconds_bucket" in metrics and "qpo_proxy_upstream_seconds_count" in metrics
    assert 'qpo_proxy_requests_total{code="200",route="chat"}' in metrics


def test_bad_requests_get_openai_shaped_errors_and_the_proxy_keeps_serving(proxy) -> None:
    base, _ = proxy
    for content, code in ((b"{not json", "invalid_json"), (b"[1, 2]", "invalid_type"),
                          (b'{"model": "echo"}', "invalid_type"), (b'{"model": "echo", "messages": "hi"}', "invalid_type"),
                          (b'{"model": "echo", "messages": [1]}', "invalid_type"), (b"\xff\xfe", "invalid_json")):
        reply = httpx.post(f"{base}/chat/completions", content=content, headers={"content-type": "application/json"})
        assert reply.status_code == 400, content
        error = reply.json()["error"]
        assert error["code"] == code and error["type"] == "invalid_request_error" and error["message"]
    assert httpx.get(base.removesuffix("/v1") + "/healthz").status_code == 200


def test_upstream_errors_are_relayed_with_their_status(proxy) -> None:
    base, _ = proxy
    for status, error in ((400, openai.BadRequestError), (429, openai.RateLimitError),
                          (500, openai.InternalServerError)):
        with pytest.raises(error) as caught:
            client(base).chat.completions.create(model=f"error-{status}", messages=[{"role": "user", "content": QUERY}])
        assert caught.value.status_code == status and caught.value.body["code"] == f"e{status}"


def test_hostile_queries_through_http_reach_the_upstream_verbatim(proxy) -> None:
    from test_hostile_inputs import HOSTILE

    base, _ = proxy
    for name, query in HOSTILE.items():
        body = json.dumps({"model": "echo", "messages": [{"role": "user", "content": query}]})  # lone surrogates escaped
        reply = httpx.post(f"{base}/chat/completions", content=body, headers={"content-type": "application/json"},
                           timeout=60)
        assert reply.status_code == 200, name
        got = json.loads(reply.json()["choices"][0]["message"]["content"])
        sent = json.loads(body)["messages"][0]["content"]  # what JSON carries (an escaped surrogate pair is one emoji)
        assert sent in got["body"]["messages"][0]["content"], name
        assert reply.headers["x-qpo-status"] in ("rewritten", "skipped"), name


def test_langchain_chat_openai_through_the_proxy(proxy, optimizer) -> None:
    langchain_openai = pytest.importorskip("langchain_openai")
    base, _ = proxy
    model = langchain_openai.ChatOpenAI(base_url=base, api_key="sk-lc", model="echo", max_retries=0)
    rewritten_query = optimizer.template.user_text(expected_prompt(optimizer, QUERY), QUERY)
    got = json.loads(model.invoke([("system", "Be brief."), ("human", QUERY)]).content)
    assert got["body"]["messages"] == [{"role": "system", "content": "Be brief."},
                                       {"role": "user", "content": rewritten_query}]
    streamed = "".join(chunk.content for chunk in model.stream([("human", QUERY)]))
    assert json.loads(streamed)["body"]["messages"][0]["content"] == rewritten_query


def test_keys_are_replaced_or_required_and_never_logged(bundle: Path, echo: str, tmp_path: Path) -> None:
    secret, token = "sk-upstream-SECRET-1", "proxy-TOKEN-2"
    env = {"QPO_TEST_UPSTREAM_KEY": secret, "QPO_TEST_PROXY_TOKEN": token}
    log = tmp_path / "proxy.log"
    context, base = qpo_serve(bundle, echo, log, "--upstream-key-env", "QPO_TEST_UPSTREAM_KEY",
                              "--require-token-env", "QPO_TEST_PROXY_TOKEN", env=env)
    with context:
        with pytest.raises(openai.AuthenticationError) as caught:
            client(base, "wrong").chat.completions.create(model="echo", messages=[{"role": "user", "content": QUERY}])
        assert caught.value.status_code == 401 and token not in str(caught.value.body)
        got = received(client(base, token).chat.completions.create(
            model="echo", messages=[{"role": "user", "content": QUERY}]))
        assert got["headers"]["authorization"] == f"Bearer {secret}"  # replaced; the proxy token goes no further
        with pytest.raises(openai.APIStatusError) as caught:
            client(base, token).chat.completions.create(model="error-500", messages=[{"role": "user", "content": QUERY}])
        metrics = httpx.get(base.removesuffix("/v1") + "/metrics").text
    assert secret not in metrics and token not in metrics
    assert secret not in log.read_text() and token not in log.read_text()
    # Without a key option the proxy token is dropped rather than forwarded.
    context, base = qpo_serve(bundle, echo, tmp_path / "p2.log", "--require-token-env", "QPO_TEST_PROXY_TOKEN", env=env)
    with context:
        got = received(client(base, token).chat.completions.create(model="echo", messages=[{"role": "user", "content": QUERY}]))
        assert "authorization" not in got["headers"]


def test_fail_open_fail_closed_only_model_and_body_limit(bundle: Path, echo: str, tmp_path: Path) -> None:
    message = [{"role": "user", "content": QUERY}]
    # A budget no decode meets: fail-open sends the request on unchanged, fail-closed answers 503.
    context, base = qpo_serve(bundle, echo, tmp_path / "open.log", "--latency-budget-ms", "0.001",
                              "--only-model", "echo", "--max-body-mb", "0.01")
    with context:
        raw = client(base).chat.completions.with_raw_response.create(model="echo", messages=message)
        assert raw.headers["x-qpo-status"] == "timeout" and received(raw.parse())["body"]["messages"] == message
        raw = client(base).chat.completions.with_raw_response.create(model="slow-stream", messages=message)
        assert raw.headers["x-qpo-status"] == "passthrough"  # not in --only-model
        big = httpx.post(f"{base}/chat/completions", json={"model": "echo", "messages": [
            {"role": "user", "content": "x" * 20_000}]})
        assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large"
    context, base = qpo_serve(bundle, echo, tmp_path / "closed.log", "--latency-budget-ms", "0.001", "--fail-closed")
    with context, pytest.raises(openai.APIStatusError) as caught:
        client(base).chat.completions.create(model="echo", messages=message)
    assert caught.value.status_code == 503 and caught.value.body["code"] == "qpo_timeout"


def test_upstream_timeout_and_unreachable_upstream(bundle: Path, echo: str, tmp_path: Path) -> None:
    message = [{"role": "user", "content": QUERY}]
    context, base = qpo_serve(bundle, echo, tmp_path / "t.log", "--read-timeout-s", "1")
    with context, pytest.raises(openai.APIStatusError) as caught:
        client(base).chat.completions.create(model="hang", messages=message)
    assert caught.value.status_code == 504 and caught.value.body["code"] == "upstream_timeout"
    dead = f"http://127.0.0.1:{free_port()}/v1"
    context, base = qpo_serve(bundle, dead, tmp_path / "u.log")
    with context, pytest.raises(openai.APIStatusError) as caught:
        client(base).chat.completions.create(model="echo", messages=message)
    assert caught.value.status_code == 502 and caught.value.body["code"] == "upstream_unreachable"
    assert "unreachable" in caught.value.body["message"]


def test_bad_options_are_refused_with_the_fix(bundle: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from qpo_middleware.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["serve", "--bundle", str(bundle), "--upstream", "ftp://x"])
    assert result.exit_code == 2 and "http(s) base URL" in result.output
    result = runner.invoke(app, ["serve", "--bundle", str(bundle), "--upstream", "http://127.0.0.1:9/v1",
                                 "--upstream-key-env", "QPO_NO_SUCH_VARIABLE"])
    assert result.exit_code == 2 and "QPO_NO_SUCH_VARIABLE" in result.output
    result = runner.invoke(app, ["serve", "--bundle", str(tmp_path), "--upstream", "http://127.0.0.1:9/v1"])
    assert result.exit_code == 2 and "qpo.json" in result.output


@pytest.mark.real
def test_proxy_in_front_of_the_real_smollm2(bundle: Path, tmp_path: Path) -> None:
    context, url = upstream("_smollm2_upstream.py", tmp_path / "smollm2.log", timeout=300)
    with context:
        proxy_context, base = qpo_serve(bundle, url, tmp_path / "proxy.log")
        with proxy_context:
            raw = client(base).chat.completions.with_raw_response.create(
                model="smollm2", messages=[{"role": "user", "content": "What is the capital of France?"}], max_tokens=12)
            answer = raw.parse().choices[0].message.content
    assert raw.headers["x-qpo-status"] == "rewritten" and answer.strip()


def test_the_proxy_needs_no_torch(bundle: Path) -> None:
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import importlib.abc, sys

        class Blocker(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "transformers", "optimum"):
                    raise ImportError(f"{name} is blocked in this test")

        sys.meta_path.insert(0, Blocker())
        from qpo_middleware.cli.serve import command
        from qpo_middleware.serve import ProxyConfig, create_app

        create_app(ProxyConfig(upstream="http://127.0.0.1:9/v1"), sys.argv[1])
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", code, str(bundle)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr
