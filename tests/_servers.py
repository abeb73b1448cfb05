"""Real server processes on 127.0.0.1 for the proxy's tests: start, wait until they answer, stop."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def server(command: Sequence[str], ready_url: str, *, env: dict[str, str] | None = None, log: Path | None = None,
           timeout: float = 120.0) -> Iterator[subprocess.Popen]:
    """Run ``command`` until the block ends; wait until ``ready_url`` answers 200 (or fail with its output)."""
    out = open(log, "wb") if log is not None else subprocess.DEVNULL  # noqa: SIM115 (closed below)
    process = subprocess.Popen(list(command), env={**os.environ, **(env or {})}, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                text = log.read_text(errors="replace")[-3000:] if log is not None else ""
                raise RuntimeError(f"{command[:3]} exited with {process.returncode} before it was ready:\n{text}")
            try:
                if httpx.get(ready_url, timeout=2.0).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{ready_url} did not answer within {timeout} s")
            time.sleep(0.1)
        yield process
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if log is not None:
            out.close()


def upstream(script: str, log: Path, ready_path: str = "/v1/models", timeout: float = 120.0):
    """A test upstream (``_echo_upstream.py`` or ``_smollm2_upstream.py``) on a free port: yields its /v1 URL."""
    port = free_port()
    return server([sys.executable, str(HERE / script), str(port)], f"http://127.0.0.1:{port}{ready_path}",
                  log=log, timeout=timeout), f"http://127.0.0.1:{port}/v1"


def qpo_serve(bundle: Path, upstream_url: str, log: Path, *args: str, env: dict[str, str] | None = None):
    """``qpo serve`` as a real process on a free port: (context manager, its /v1 base URL)."""
    port = free_port()
    command = [sys.executable, "-c", "from qpo_middleware.cli import main; main()", "serve", "--bundle", str(bundle),
               "--upstream", upstream_url, "--port", str(port), "--log-level", "warning", *args]
    return server(command, f"http://127.0.0.1:{port}/healthz", env=env, log=log), f"http://127.0.0.1:{port}/v1"
