"""An OpenAI-compatible upstream that answers with the embedded SmolLM2 (transformers, greedy), as its own
process: ``python _smollm2_upstream.py PORT``. Non-streaming ``POST /v1/chat/completions`` only."""

from __future__ import annotations

import sys
import threading
import time

import uvicorn
from _echo_upstream import models  # the same model list route (run as a script, tests/ is on sys.path)
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from qpo_middleware.training.models import load_model_and_tokenizer, resolve_model

model, tokenizer = load_model_and_tokenizer(resolve_model())
model.eval()
lock = threading.Lock()


def answer(messages: list[dict], max_tokens: int) -> str:
    import torch

    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
    with lock, torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, do_sample=False,
                             pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


async def chat(request: Request) -> Response:
    import asyncio

    body = await request.json()
    text = await asyncio.to_thread(answer, body["messages"], int(body.get("max_tokens") or 16))
    return JSONResponse({"id": "chatcmpl-smollm2", "object": "chat.completion", "created": int(time.time()),
                         "model": body.get("model", "smollm2"),
                         "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                      "finish_reason": "length", "logprobs": None}],
                         "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}})


app = Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"]), Route("/v1/models", models)])

if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
