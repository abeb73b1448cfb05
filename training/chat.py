"""A local LangChain chat model over the embedded SmolLM2 (torch + transformers), for examples and real tests.

``ChatHuggingFace`` over a local ``HuggingFacePipeline`` (langchain-huggingface,
which works beside transformers 4.57), with two additions for local use:

* async: ``ChatHuggingFace`` refuses ``ainvoke``/``astream`` on a local pipeline;
  here they run the pipeline in a worker thread, so the event loop is not blocked;
* a lock around the pipeline: concurrent ``batch``/``abatch`` calls take turns
  instead of sharing one model object between threads.

It lives on the training side because it needs torch, transformers and langchain-huggingface:
the ``train`` extra (which brings langchain-core too). The ``langchain`` integration itself
stays torch-free. Nothing is downloaded: the model is resolved by
:func:`qpo_middleware.training.models.resolve_model`.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from typing import Any

from langchain_core.callbacks import CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import BaseMessage
from langchain_core.outputs import ChatGenerationChunk, ChatResult
from langchain_huggingface import ChatHuggingFace, HuggingFacePipeline
from pydantic import PrivateAttr

from qpo_middleware.training.models import DEFAULT_MODEL

__all__ = ["LocalChatHuggingFace", "local_smollm2_chat"]


class LocalChatHuggingFace(ChatHuggingFace):
    """``ChatHuggingFace`` over a local pipeline, with async support and one call at a time."""

    _pipeline_lock: Any = PrivateAttr(default_factory=threading.Lock)

    # ChatHuggingFace's own arguments (``stream``, ...) pass through ``kwargs``. ``run_manager`` stays
    # a named parameter: BaseChatModel passes it only to a _generate that names it.

    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        with self._pipeline_lock:
            return super()._generate(messages, stop=stop, run_manager=run_manager, **kwargs)

    def _stream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> Iterator[ChatGenerationChunk]:
        with self._pipeline_lock:
            yield from super()._stream(messages, stop=stop, run_manager=run_manager, **kwargs)

    # BaseChatModel's defaults run the sync methods above in a worker thread.
    _agenerate = BaseChatModel._agenerate
    _astream = BaseChatModel._astream


def local_smollm2_chat(
    max_new_tokens: int = 64,
    *,
    model: str | os.PathLike[str] = DEFAULT_MODEL,
    do_sample: bool = False,
) -> LocalChatHuggingFace:
    """A chat model over SmolLM2-135M-Instruct (or ``model``: any local checkpoint or cached hub id).

    Greedy by default (``do_sample=False``); replies are at most ``max_new_tokens`` tokens
    and hold only the new text (the pipeline runs with ``return_full_text=False``).
    Loading takes a few seconds on CPU.
    """
    from transformers import pipeline

    from qpo_middleware.training.models import load_model_and_tokenizer

    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1; got {max_new_tokens}.")
    lm, tokenizer = load_model_and_tokenizer(model)
    generation = {"max_new_tokens": max_new_tokens, "do_sample": do_sample, "return_full_text": False}
    if not do_sample:
        # Greedy: drop the sampling defaults of the checkpoint's generation config (they only warn).
        generation.update(temperature=None, top_p=None, top_k=None)
    text_generation = pipeline(
        "text-generation", model=lm, tokenizer=tokenizer, pad_token_id=tokenizer.pad_token_id, **generation
    )
    llm = HuggingFacePipeline(pipeline=text_generation, model_id=os.fspath(model), pipeline_kwargs=generation)
    return LocalChatHuggingFace(llm=llm, tokenizer=tokenizer)
