"""``qpo serve``: the OpenAI-compatible proxy (torch-free; the ``serve`` extra)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from ._common import err_console, user_errors

SERVE_EXTRA_INSTALL = "pip install 'qpo-middleware[cpu,serve]'"


def _secret(env: str | None, option: str) -> str | None:
    if env is None:
        return None
    value = os.environ.get(env)
    if not value:
        raise ValueError(f"{option} {env}: the environment variable {env} is not set or empty; export it first.")
    return value


def command(
    bundle: Annotated[Path, typer.Option("--bundle", "-b", help="Bundle directory made by `qpo export`.")],
    upstream: Annotated[str, typer.Option(help="The OpenAI-compatible base URL to forward to, e.g. "
                                          "http://127.0.0.1:8080/v1. Fixed for the proxy's life.")],
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    latency_budget_ms: Annotated[float | None, typer.Option(
        help="Longest the policy may take per request; past it the query goes on without a prompt.")] = None,
    fail_closed: Annotated[bool, typer.Option(
        "--fail-closed", help="Answer 503 when the policy cannot rewrite in time, instead of forwarding the "
        "request unchanged.")] = False,
    only_model: Annotated[list[str] | None, typer.Option(
        "--only-model", help="Rewrite only requests for this model (repeat for several); others pass through.")] = None,
    upstream_key_env: Annotated[str | None, typer.Option(
        help="Send the key in this environment variable upstream instead of the caller's Authorization.")] = None,
    require_token_env: Annotated[str | None, typer.Option(
        help="Clients must send 'Authorization: Bearer <the token in this environment variable>'.")] = None,
    max_body_mb: Annotated[float, typer.Option(help="Largest request body accepted (MB).")] = 4.0,
    max_in_flight: Annotated[int, typer.Option(help="Requests handled at once; more get 429.")] = 256,
    connect_timeout_s: Annotated[float, typer.Option(help="Upstream connect timeout (s).")] = 5.0,
    read_timeout_s: Annotated[float, typer.Option(help="Upstream read timeout (s).")] = 600.0,
    batch_window_ms: Annotated[float, typer.Option(
        help="Micro-batching window: concurrent requests arriving within it share one decode.")] = 2.0,
    max_batch_size: Annotated[int, typer.Option(help="Rows per shared decode.")] = 16,
    log_level: Annotated[str, typer.Option(help="uvicorn's log level.")] = "info",
) -> None:
    """Serve an OpenAI-compatible proxy that rewrites each chat request's query with the policy."""
    with user_errors():
        try:
            import uvicorn

            from qpo_middleware.config import RuntimeConfig
            from qpo_middleware.serve import ProxyConfig, create_app
        except ModuleNotFoundError as exc:
            raise ValueError(f"qpo serve needs the serve extra ({exc.name!r} is not installed): "
                             f"{SERVE_EXTRA_INSTALL}") from None
        if not (bundle / "qpo.json").is_file():
            raise FileNotFoundError(f"{bundle} has no qpo.json: pass the bundle directory made by `qpo export`.")
        config = ProxyConfig(
            upstream=upstream, upstream_key=_secret(upstream_key_env, "--upstream-key-env"),
            require_token=_secret(require_token_env, "--require-token-env"), only_models=tuple(only_model or ()),
            max_body_bytes=int(max_body_mb * (1 << 20)), connect_timeout_s=connect_timeout_s,
            read_timeout_s=read_timeout_s, max_in_flight=max_in_flight,
        )
        runtime = RuntimeConfig(batch_window_ms=batch_window_ms, max_batch_size=max_batch_size,
                                latency_budget_ms=latency_budget_ms, fail_open=not fail_closed)
        app = create_app(config, bundle, runtime=runtime)
    err_console.print(f"qpo serve: http://{host}:{port}/v1 -> {config.upstream_display} (bundle {bundle})")
    uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=False)
