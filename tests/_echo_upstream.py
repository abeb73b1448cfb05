"""An OpenAI-compatible upstream for the proxy's tests, run as its own process: ``python _echo_upstream.py PORT``.

``POST /v1/chat/completions`` answers with what it received: the assistant message's content is the
JSON of ``{"body": <request body>, "headers": <request headers>}``; with ``"stream": true`` the same
text comes back as server-sent chat.completion.chunk events. The model name picks a behaviour:

* ``slow-stream``: 6 chunks, 0.4 s apart (a proxy that buffers would deliver them all at the end);
* ``error-400`` / ``error-429`` / ``error-500``: that status with an OpenAI error body;
* ``hang``: no answer for 30 s (upstream read timeouts).

``GET /v1/models`` lists ``echo``.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route


def completion(model: str, content: str) -> dict:
    return {"id": "chatcmpl-echo", "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop",
                         "logprobs": None}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}


def chunk(model: str, delta: dict, finish: str | None = None) -> bytes:
    data = {"id": "chatcmpl-echo", "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}
    return f"data: {json.dumps(data)}\n\n".encode()


async def chat(request: Request) -> Response:
    raw = await request.body()
    body = json.loads(raw)
    model = body.get("model", "echo")
    if model.startswith("error-"):
        status = int(model.split("-")[1])
        return JSONResponse({"error": {"message": f"upstream says {status}", "type": "upstream_test",
                                       "param": None, "code": f"e{status}"}}, status_code=status)
    if model == "hang":
        await asyncio.sleep(30)
    content = json.dumps({"body": body, "headers": dict(request.headers)})
    if not body.get("stream"):
        return JSONResponse(completion(model, content), headers={"x-upstream": "echo"})
    pieces = 6 if model == "slow-stream" else 3
    size = -(-len(content) // pieces)

    async def events():
        yield chunk(model, {"role": "assistant", "content": ""})
        for i in range(pieces):
            if model == "slow-stream":
                await asyncio.sleep(0.4)
            yield chunk(model, {"content": content[i * size : (i + 1) * size]})
        yield chunk(model, {}, "stop")
        yield b"data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


async def models(request: Request) -> Response:
    return JSONResponse({"object": "list", "data": [{"id": "echo", "object": "model", "created": 0,
                                                     "owned_by": "qpo-tests"}]})


app = Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"]), Route("/v1/models", models)])

if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
