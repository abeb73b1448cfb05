"""``qpo serve``: an OpenAI-compatible proxy that rewrites each chat request's query with the policy.

Any app that speaks the OpenAI chat API (the OpenAI SDKs, LiteLLM, LangChain's ``ChatOpenAI``) gets QPO
by pointing its base URL at the proxy. The proxy forwards to one upstream fixed at start (vLLM,
llama.cpp's server, Ollama's ``/v1``, OpenAI itself):

* ``POST /v1/chat/completions``: the last user message's text is rewritten exactly as the LangChain
  rewriter does it (the bundle's template; the query verbatim); every other message and field goes
  upstream unchanged, and streamed replies are relayed chunk by chunk as they arrive.
* ``GET /v1/models`` is forwarded; ``GET /healthz`` is 200 once the bundle is loaded and verified;
  ``GET /metrics`` is Prometheus text.

The response headers ``x-qpo-status`` (a :class:`~qpo_middleware.runtime.Status`) and
``x-qpo-latency-ms`` say what the policy did. Concurrent requests share the runtime's micro-batcher;
its latency budget and fail-open apply. Keys never reach logs, metrics or error bodies.
Built on Starlette/FastAPI, uvicorn and httpx (the ``serve`` extra); torch-free like the runtime.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest

from .config import RuntimeConfig
from .runtime import LatencyBudgetExceeded, PromptOptimizer, QueueFullError, Status
from .template import Template, append_text, content_text

logger = logging.getLogger(__name__)

SKIP_HEADER = "x-qpo-skip"
STATUS_HEADER = "x-qpo-status"
LATENCY_HEADER = "x-qpo-latency-ms"
# Hop-by-hop headers (RFC 9110 7.6.1) and the ones the proxy sets itself are never relayed.
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
               "transfer-encoding", "upgrade", "host", "content-length", "accept-encoding", "content-encoding"}


class ProxyConfigError(ValueError):
    """A proxy setting is invalid; the message names the option and the fix."""


@dataclass(frozen=True)
class ProxyConfig:
    """How ``qpo serve`` runs. ``upstream`` is the OpenAI-compatible base URL, e.g. ``http://127.0.0.1:8080/v1``.

    ``upstream_key``: the key sent upstream instead of the caller's ``Authorization`` (read from
    ``--upstream-key-env``). ``require_token``: callers must send ``Authorization: Bearer <token>``
    (read from ``--require-token-env``); that token is the proxy's, so it is never forwarded.
    ``only_models``: rewrite only requests for these models (empty: all). ``max_body_bytes``,
    ``connect_timeout_s``, ``read_timeout_s`` and ``max_in_flight`` bound each request.
    """

    upstream: str
    upstream_key: str | None = field(default=None, repr=False)
    require_token: str | None = field(default=None, repr=False)
    only_models: tuple[str, ...] = ()
    max_body_bytes: int = 4 << 20
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 600.0
    max_in_flight: int = 256

    def __post_init__(self) -> None:
        parts = urlsplit(self.upstream)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ProxyConfigError(f"--upstream must be an http(s) base URL like http://127.0.0.1:8080/v1; "
                                   f"got {self.upstream!r}.")
        if parts.query or parts.fragment:
            raise ProxyConfigError("--upstream must not carry a query or fragment; pass the base URL only.")
        for name in ("max_body_bytes", "max_in_flight"):
            if getattr(self, name) < 1:
                raise ProxyConfigError(f"{name} must be at least 1; got {getattr(self, name)}.")
        for name in ("connect_timeout_s", "read_timeout_s"):
            if not getattr(self, name) > 0:
                raise ProxyConfigError(f"{name} must be > 0 seconds; got {getattr(self, name)}.")

    @property
    def upstream_display(self) -> str:
        """The upstream URL without user:password, for logs and error bodies."""
        parts = urlsplit(self.upstream)
        host = parts.hostname or ""
        netloc = f"{host}:{parts.port}" if parts.port else host
        return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def openai_error(status: int, message: str, code: str, kind: str = "invalid_request_error",
                 param: str | None = None, headers: Mapping[str, str] | None = None) -> JSONResponse:
    """An error in the OpenAI API's shape: ``{"error": {"message", "type", "param", "code"}}``."""
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                        status_code=status, headers=dict(headers or {}))


def last_user_index(messages: list[Any]) -> int | None:
    """The index of the last message with role ``user`` (the query), or ``None``."""
    return next((i for i in reversed(range(len(messages)))
                 if isinstance(messages[i], dict) and messages[i].get("role") == "user"), None)


def place_prompt(messages: list[dict[str, Any]], index: int, prompt: str, template: Template) -> list[dict[str, Any]]:
    """The messages with the policy's prompt placed as the LangChain rewriter places it (a copy; the
    query text and every other message unchanged): in the user turn for ``before``/``after``, in the
    system message for ``system`` (after the caller's own system text, or as a new first message)."""
    out = list(messages)
    if template.placement == "system":
        first = out[0]
        if first.get("role") == "system" and isinstance(first.get("content"), str | list):
            out[0] = {**first, "content": append_text(first["content"], template.separator + prompt)}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    else:
        out[index] = {**out[index], "content": template.add_prompt(out[index]["content"], prompt)}
    return out


class _Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("qpo_proxy_requests", "Requests by route and response status code.",
                                ["route", "code"], registry=self.registry)
        self.rewrites = Counter("qpo_proxy_rewrites", "Chat requests by what the policy did (x-qpo-status).",
                                ["status"], registry=self.registry)
        self.rewrite_seconds = Histogram("qpo_proxy_rewrite_seconds", "Time the policy took per rewritten request.",
                                         registry=self.registry,
                                         buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
        self.upstream_seconds = Histogram("qpo_proxy_upstream_seconds", "Time to the upstream's response headers.",
                                          registry=self.registry,
                                          buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
        self.errors = Counter("qpo_proxy_errors", "Errors by kind.", ["kind"], registry=self.registry)


class _Proxy:
    """The app's state: the policy (loaded in the background), the upstream client, limits and metrics."""

    def __init__(self, config: ProxyConfig, load: Any) -> None:
        self.config = config
        self.load = load  # () -> PromptOptimizer, run in a thread at startup
        self.optimizer: PromptOptimizer | None = None
        self.load_error: str | None = None
        self.metrics = _Metrics()
        self.in_flight = 0
        self.client: httpx.AsyncClient | None = None

    async def start(self) -> None:
        timeout = httpx.Timeout(connect=self.config.connect_timeout_s, read=self.config.read_timeout_s,
                                write=self.config.read_timeout_s, pool=self.config.connect_timeout_s)
        limits = httpx.Limits(max_connections=self.config.max_in_flight,
                              max_keepalive_connections=min(64, self.config.max_in_flight))
        self.client = httpx.AsyncClient(timeout=timeout, limits=limits, trust_env=False)
        asyncio.get_running_loop().create_task(self._load())

    async def _load(self) -> None:
        try:
            self.optimizer = await asyncio.to_thread(self.load)
            logger.info("qpo serve: policy ready (%s)", self.optimizer.info()["bundle"])
        except Exception as exc:  # the health check reports it; requests fail open or closed
            self.load_error = f"{type(exc).__name__}: {exc}"
            logger.error("qpo serve: the bundle did not load: %s", self.load_error)

    async def stop(self) -> None:
        if self.client is not None:
            await self.client.aclose()
        if self.optimizer is not None:
            self.optimizer.close()

    def upstream_url(self, path: str) -> str:
        return self.config.upstream.rstrip("/") + path

    def upstream_headers(self, request: Request) -> dict[str, str]:
        headers = {k: v for k, v in request.headers.items()
                   if k.lower() not in _HOP_BY_HOP and not k.lower().startswith("x-qpo-")}
        if self.config.upstream_key is not None:
            headers["authorization"] = f"Bearer {self.config.upstream_key}"
        elif self.config.require_token is not None:
            headers.pop("authorization", None)  # the proxy's own token goes no further
        return headers

    def authorized(self, request: Request) -> bool:
        if self.config.require_token is None:
            return True
        sent = request.headers.get("authorization", "")
        expected = f"Bearer {self.config.require_token}"
        return hmac.compare_digest(sent.encode("utf-8", "replace"), expected.encode("utf-8"))


def _relayed_headers(response: httpx.Response) -> dict[str, str]:
    """The upstream's response headers the client gets (uvicorn writes its own date and server)."""
    return {k: v for k, v in response.headers.items() if k.lower() not in _HOP_BY_HOP | {"date", "server"}}


def create_app(config: ProxyConfig, bundle: str | os.PathLike[str] | None = None, *,
               runtime: RuntimeConfig | None = None, optimizer: PromptOptimizer | None = None) -> FastAPI:
    """The proxy as an ASGI app: ``bundle`` is loaded in the background (``runtime`` sets how it runs;
    micro-batching is on by default), or ``optimizer`` is used as it is."""
    if (bundle is None) == (optimizer is None):
        raise ValueError("Pass a bundle directory or a PromptOptimizer.")
    runtime = runtime or RuntimeConfig(batch_window_ms=2.0)

    def load() -> PromptOptimizer:
        return optimizer if optimizer is not None else PromptOptimizer.from_bundle(bundle, config=runtime)

    proxy = _Proxy(config, load)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await proxy.start()
        try:
            yield
        finally:
            await proxy.stop()

    app = FastAPI(title="qpo serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.proxy = proxy
    metrics = proxy.metrics

    def done(route: str, response: Response) -> Response:
        metrics.requests.labels(route, str(response.status_code)).inc()
        return response

    @app.get("/healthz")
    async def healthz() -> Response:
        if proxy.optimizer is not None:
            return JSONResponse({"status": "ready", **proxy.optimizer.info()})
        if proxy.load_error is not None:
            return JSONResponse({"status": "error", "error": proxy.load_error}, status_code=503)
        return JSONResponse({"status": "loading"}, status_code=503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        if not proxy.authorized(request):
            return done("models", openai_error(401, "Missing or wrong bearer token for this proxy.",
                                               "invalid_api_key", "authentication_error"))
        return done("models", await forward(request, "GET", "/models", None, {}))

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        if not proxy.authorized(request):
            return done("chat", openai_error(401, "Missing or wrong bearer token for this proxy.",
                                             "invalid_api_key", "authentication_error"))
        if proxy.in_flight >= config.max_in_flight:
            metrics.errors.labels("overloaded").inc()
            return done("chat", openai_error(429, f"The proxy has {config.max_in_flight} requests in flight; retry "
                                             "shortly.", "too_many_requests", "rate_limit_error",
                                             headers={"retry-after": "1"}))
        proxy.in_flight += 1
        try:
            return done("chat", await chat_request(request))
        finally:
            proxy.in_flight -= 1

    async def read_body(request: Request) -> bytes | Response:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > config.max_body_bytes:
            return openai_error(413, f"The request body is larger than {config.max_body_bytes} bytes.",
                                "request_too_large")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > config.max_body_bytes:
                return openai_error(413, f"The request body is larger than {config.max_body_bytes} bytes.",
                                    "request_too_large")
        return bytes(body)

    async def chat_request(request: Request) -> Response:
        body = await read_body(request)
        if isinstance(body, Response):
            metrics.errors.labels("bad_request").inc()
            return body
        try:
            payload = json.loads(body)
        except (ValueError, RecursionError):
            metrics.errors.labels("bad_request").inc()
            return openai_error(400, "The request body is not valid JSON.", "invalid_json")
        if not isinstance(payload, dict):
            return openai_error(400, "The request body must be a JSON object.", "invalid_type")
        messages = payload.get("messages")
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            metrics.errors.labels("bad_request").inc()
            return openai_error(400, "'messages' must be a non-empty list of message objects.", "invalid_type",
                                param="messages")
        model = payload.get("model")
        status, latency_ms = Status.SKIPPED, 0.0
        index = last_user_index(messages)
        query = content_text(messages[index].get("content")) if index is not None else ""
        if request.headers.get(SKIP_HEADER, "").strip().lower() in ("1", "true", "yes") or (
                config.only_models and model not in config.only_models):
            status = Status.PASSTHROUGH
        elif query.strip():
            outcome = await rewrite(query)
            if isinstance(outcome, Response):
                return outcome
            prompt, status, latency_ms = outcome
            if prompt:
                assert index is not None and proxy.optimizer is not None
                payload = {**payload, "messages": place_prompt(messages, index, prompt, proxy.optimizer.template)}
                body = json.dumps(payload).encode("ascii")  # escapes keep lone surrogates valid JSON
                logger.debug("qpo serve: prompt %r", prompt)
        metrics.rewrites.labels(str(status)).inc()
        headers = {STATUS_HEADER: str(status), LATENCY_HEADER: f"{latency_ms:.1f}"}
        return await forward(request, "POST", "/chat/completions", body, headers,
                             stream=payload.get("stream") is True)

    async def rewrite(query: str) -> tuple[str, Status, float] | Response:
        """The policy's prompt for ``query``: (prompt, status, ms), or the fail-closed error response."""
        optimizer = proxy.optimizer
        fail_open = runtime.fail_open if optimizer is None else optimizer.config.fail_open
        if optimizer is None:
            metrics.errors.labels("policy_unavailable").inc()
            if not fail_open:
                return openai_error(503, "The prompt policy is not loaded yet (or failed to load: see /healthz).",
                                    "qpo_unavailable", "server_error")
            return "", Status.ERROR, 0.0
        start = time.perf_counter()
        try:
            result = await optimizer.aoptimize(query)
        except (LatencyBudgetExceeded, QueueFullError) as exc:  # only without fail-open
            metrics.errors.labels("policy_timeout").inc()
            return openai_error(503, f"The prompt policy did not answer in time ({type(exc).__name__}); the "
                                "request was not sent.", "qpo_timeout", "server_error")
        except Exception as exc:
            metrics.errors.labels("policy_error").inc()
            logger.exception("qpo serve: the policy failed")
            if not fail_open:
                return openai_error(500, f"The prompt policy failed ({type(exc).__name__}); the request was not "
                                    "sent.", "qpo_error", "server_error")
            return "", Status.ERROR, (time.perf_counter() - start) * 1000.0
        metrics.rewrite_seconds.observe(time.perf_counter() - start)
        return result.prompt, result.status, result.latency_ms

    async def forward(request: Request, method: str, path: str, body: bytes | None, headers: dict[str, str],
                      stream: bool = False) -> Response:
        assert proxy.client is not None
        upstream = proxy.client.build_request(method, proxy.upstream_url(path), content=body,
                                              headers=proxy.upstream_headers(request))
        start = time.perf_counter()
        try:
            response = await proxy.client.send(upstream, stream=True)
        except httpx.TimeoutException:
            metrics.errors.labels("upstream_timeout").inc()
            return openai_error(504, f"The upstream {config.upstream_display} did not answer in time.",
                                "upstream_timeout", "server_error", headers=headers)
        except httpx.HTTPError as exc:
            metrics.errors.labels("upstream_unreachable").inc()
            return openai_error(502, f"The upstream {config.upstream_display} is unreachable "
                                f"({type(exc).__name__}).", "upstream_unreachable", "server_error", headers=headers)
        metrics.upstream_seconds.observe(time.perf_counter() - start)
        relayed = {**_relayed_headers(response), **headers}
        if stream and response.status_code < 400:
            async def chunks() -> AsyncIterator[bytes]:
                try:
                    async for chunk in response.aiter_bytes():
                        yield chunk
                except httpx.HTTPError:
                    metrics.errors.labels("upstream_stream").inc()
                    logger.warning("qpo serve: the upstream stream broke off")
                finally:
                    await response.aclose()

            return StreamingResponse(chunks(), status_code=response.status_code, headers=relayed)
        try:
            content = await response.aread()
        except httpx.HTTPError:
            metrics.errors.labels("upstream_timeout").inc()
            return openai_error(504, f"The upstream {config.upstream_display} stopped answering.",
                                "upstream_timeout", "server_error", headers=headers)
        finally:
            await response.aclose()
        if response.status_code >= 400:
            metrics.errors.labels(f"upstream_{response.status_code // 100}xx").inc()
        return Response(content, status_code=response.status_code, headers=relayed)

    return app
