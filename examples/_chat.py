"""Shared by the examples: the command-line options and the chat model that answers.

``--chat smollm2`` (default) answers with the embedded SmolLM2 (needs the ``train``
extra: torch + transformers); ``--chat echo`` answers with the (rewritten) query
itself, so an example runs with the torch-free runtime only.
"""

from __future__ import annotations

import argparse

from langchain_core.language_models import BaseChatModel
from langchain_core.language_models.fake_chat_models import ParrotFakeChatModel


def parser(description: str, max_new_tokens: int = 16) -> argparse.ArgumentParser:
    args = argparse.ArgumentParser(description=description)
    args.add_argument("--bundle", required=True, help="bundle directory made by `qpo export`")
    args.add_argument(
        "--chat",
        choices=["smollm2", "echo"],
        default="smollm2",
        help="smollm2: the embedded SmolLM2 answers; echo: the reply is the rewritten query (no torch)",
    )
    args.add_argument(
        "--max-new-tokens", type=int, default=max_new_tokens, help="reply length cap for smollm2"
    )
    return args


def make_chat(kind: str, max_new_tokens: int) -> BaseChatModel:
    if kind == "echo":
        return ParrotFakeChatModel()
    from qpo_middleware.training.chat import local_smollm2_chat

    return local_smollm2_chat(max_new_tokens=max_new_tokens)


REVIEWS = [
    "it 's a charming and often affecting journey .",
    "unflinchingly bleak and desperate",
    "the acting , costumes , music , cinematography and sound are all astounding .",
    "a sometimes tedious film .",
    "the story is too predictable to hold your attention .",
    "a gorgeous , witty , seductive movie .",
    "it 's slow -- very , very slow .",
    "a masterpiece four years in the making .",
    "the jokes are flat and the pacing is sluggish .",
    "an intelligent , moving and invigorating film .",
    "it never rises above its own clichés .",
    "one of the most exciting action films of the year .",
    "a muddled , overlong mess .",
    "the performances are uniformly excellent .",
    "there is not a single memorable scene in it .",
    "warm , funny and surprisingly poignant .",
    "the dialogue is painfully stilted .",
    "a triumph of style and substance .",
    "i left the theater feeling cheated .",
    "a small gem of a movie .",
]
