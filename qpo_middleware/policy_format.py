"""How a query becomes the policy's input ids, shared by training and the runtime.

The policy is a plain causal LM. Its input is::

    prefix_ids + [reward_token_id] + query_ids[:query_max_tokens] + separator_ids

and it continues with the prompt tokens, then ``eos``. Reward conditioning is a
special token per reward bucket (bucket 0 = lowest reward); at inference the
policy is conditioned on the top bucket. Training builds its examples with
:meth:`PolicyFormat.input_ids` and the runtime builds its inputs with the same
method, read back from the bundle manifest.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from .text import policy_text

# A long query is tokenized from a prefix of at least QUERY_CHARS_PER_TOKEN * (query_max_tokens +
# QUERY_TOKEN_MARGIN) characters, grown until it holds QUERY_TOKEN_MARGIN tokens more than are read.
QUERY_CHARS_PER_TOKEN = 16
QUERY_TOKEN_MARGIN = 8


class PolicyFormatError(ValueError):
    """The policy format in a manifest or config is invalid."""


def brief_repr(value: Any, limit: int = 120) -> str:
    """``repr(value)`` for an error message: cut to ``limit`` characters, and safe for any value.

    Manifests are untrusted: a value may be a 16 MB string or an int too long for ``repr``
    (Python refuses ints over 4300 digits), and an error message must not fail or flood logs.
    """
    try:
        text = repr(value)
    except Exception:  # e.g. ValueError: an int over sys.get_int_max_str_digits() digits
        return f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _is_int(value: Any) -> bool:
    """An integer that is not a bool (JSON ``true`` must not pass for a token id or a count)."""
    return isinstance(value, int) and not isinstance(value, bool)


def reward_token(bucket: int) -> str:
    """The special token string of reward bucket ``bucket``."""
    return f"<|qpo_reward_{bucket}|>"


@dataclass(frozen=True)
class PolicyFormat:
    """Token-level layout of the policy's input; stored in the bundle's ``qpo.json``."""

    reward_token_ids: tuple[int, ...]
    separator_ids: tuple[int, ...]
    eos_token_ids: tuple[int, ...]
    prefix_ids: tuple[int, ...] = ()
    query_max_tokens: int = 40
    prompt_max_tokens: int = 40
    pad_token_id: int = 0

    def __post_init__(self) -> None:
        for name in ("reward_token_ids", "separator_ids", "eos_token_ids", "prefix_ids"):
            value = getattr(self, name)
            if not isinstance(value, tuple) or not all(_is_int(i) and i >= 0 for i in value):
                raise PolicyFormatError(
                    f"policy.{name} must be a list of non-negative token ids; got {brief_repr(value)}."
                )
        if not self.reward_token_ids:
            raise PolicyFormatError("policy.reward_token_ids is empty: the policy needs at least one reward token.")
        if not self.eos_token_ids:
            raise PolicyFormatError("policy.eos_token_ids is empty: decoding could never stop on EOS.")
        for name in ("query_max_tokens", "prompt_max_tokens"):
            value = getattr(self, name)
            if not _is_int(value) or not 1 <= value <= 4096:
                raise PolicyFormatError(f"policy.{name} must be an integer in 1..4096; got {brief_repr(value)}.")
        if not _is_int(self.pad_token_id) or self.pad_token_id < 0:
            raise PolicyFormatError(
                f"policy.pad_token_id must be a non-negative token id; got {brief_repr(self.pad_token_id)}."
            )

    @property
    def top_bucket(self) -> int:
        return len(self.reward_token_ids) - 1

    @property
    def special_ids(self) -> frozenset[int]:
        """Ids the policy must never emit inside a prompt."""
        return frozenset(self.reward_token_ids) | frozenset(self.separator_ids) | frozenset(self.eos_token_ids)

    def input_ids(self, query_ids: Sequence[int], bucket: int | None = None) -> list[int]:
        """The policy input for an already-tokenized query, conditioned on ``bucket`` (default: top)."""
        bucket = self.top_bucket if bucket is None else bucket
        if not 0 <= bucket <= self.top_bucket:
            raise PolicyFormatError(f"Reward bucket {bucket} is outside 0..{self.top_bucket}.")
        # A query made of the policy's own special tokens must not steer it: drop them.
        special = self.special_ids
        query = [int(t) for t in query_ids if int(t) not in special][: self.query_max_tokens]
        return [*self.prefix_ids, self.reward_token_ids[bucket], *query, *self.separator_ids]

    def query_ids(self, query: str, tokenize: Callable[[str], Sequence[int]]) -> list[int]:
        """Token ids of the part of ``query`` the policy reads; ``tokenize`` encodes text without special tokens.

        The policy reads :func:`~qpo_middleware.text.policy_text` of the query, and only its first
        ``query_max_tokens`` tokens: a long query is tokenized from a prefix (at least
        ``QUERY_CHARS_PER_TOKEN * (query_max_tokens + QUERY_TOKEN_MARGIN)`` characters, grown until
        it holds ``QUERY_TOKEN_MARGIN`` tokens more than are read), so a 10 MB query costs about what
        a short one does. The ids read equal those of the whole text unless one word spans both the
        cut and the tokens read. Training and the runtime both encode queries here.
        """
        text = policy_text(query)
        wanted = self.query_max_tokens + QUERY_TOKEN_MARGIN
        special = self.special_ids  # dropped by input_ids: they do not count
        chars = wanted * QUERY_CHARS_PER_TOKEN
        while True:
            ids = [int(t) for t in tokenize(text[:chars])]
            if chars >= len(text) or sum(t not in special for t in ids) >= wanted:
                return ids
            chars *= 4

    def encode(self, query: str, tokenize: Callable[[str], Sequence[int]], bucket: int | None = None) -> list[int]:
        """The policy input for ``query`` text: :meth:`query_ids`, laid out by :meth:`input_ids`."""
        return self.input_ids(self.query_ids(query, tokenize), bucket)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PolicyFormat:
        if not isinstance(data, Mapping):
            raise PolicyFormatError(f"policy must be a JSON object; got {type(data).__name__}.")
        known = {"reward_token_ids", "separator_ids", "eos_token_ids", "prefix_ids", "query_max_tokens",
                 "prompt_max_tokens", "pad_token_id"}
        unknown = set(data) - known
        if unknown:
            raise PolicyFormatError(
                f"Unknown policy field(s) {brief_repr(sorted(map(str, unknown)))}; known: {sorted(known)}."
            )
        values: dict[str, Any] = {}
        for key, value in data.items():
            if key.endswith("_ids"):
                if not isinstance(value, list | tuple):
                    raise PolicyFormatError(f"policy.{key} must be a list of token ids; got {brief_repr(value)}.")
                value = tuple(value)
            values[key] = value
        try:
            return cls(**values)
        except TypeError as exc:
            raise PolicyFormatError(f"policy is missing a required field: {exc}") from exc
