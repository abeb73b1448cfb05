"""The offline dataset: (query, prompt, reward) records, append-only JSONL.

One record per scored (query, prompt) pair. Records are never rewritten: later
loops append theirs tagged with the loop number. The key of a record is
``(query_id, prompt, loop)``; appending a record whose key is present is a
no-op, so a resumed run never duplicates.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .io import JsonlLog
from .run import RunPaths
from .tasks import STEER_REACH, steered_label

FORMAT_VERSION = 1


class DatasetError(ValueError):
    """A record does not fit the dataset schema; the message names the field."""


@dataclass
class Record:
    """One scored (query, prompt) pair.

    ``reward`` is the training signal; its parts are kept beside it so rewards
    can be recomputed with other weights without calling the target again.
    """

    task: str
    query_id: str
    query: str
    prompt: str
    prompt_source: str  # "pool:<id>", "none", "policy", "oirl:<name>", ...
    loop: int
    target: str
    correct: bool
    reward: float
    prompt_mean_accuracy: float
    gold_nll: float | None = None
    label_nll: float | None = None  # gold NLL renormalised over the label words (classification)
    prediction: str | None = None
    label: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    v: int = FORMAT_VERSION

    def key(self) -> tuple[str, str, int]:
        return (self.query_id, self.prompt, self.loop)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Record:
        names = {f.name for f in fields(cls)}
        missing = {"task", "query_id", "query", "prompt", "prompt_source", "loop", "target", "correct",
                   "reward", "prompt_mean_accuracy"} - set(data)
        if missing:
            raise DatasetError(f"Dataset record lacks field(s) {sorted(missing)}: {str(data)[:200]}")
        record = cls(**{k: v for k, v in data.items() if k in names})
        record.validate()
        return record

    def validate(self) -> None:
        for name in ("task", "query_id", "query", "prompt", "prompt_source", "target"):
            if not isinstance(getattr(self, name), str):
                raise DatasetError(f"Record field {name!r} must be a string; got {getattr(self, name)!r}.")
        if not isinstance(self.loop, int) or self.loop < 0:
            raise DatasetError(f"Record field 'loop' must be an integer >= 0; got {self.loop!r}.")
        if not isinstance(self.correct, bool):
            raise DatasetError(f"Record field 'correct' must be true/false; got {self.correct!r}.")
        for name in ("reward", "prompt_mean_accuracy"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or value != value:  # NaN check
                raise DatasetError(f"Record field {name!r} must be a finite number; got {value!r}.")


class OfflineDataset:
    """Append-only, crash-safe store of :class:`Record` s in a run directory's ``dataset.jsonl`` (:class:`~.run.RunPaths`)."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        self.path = RunPaths(self.directory).dataset
        self._log = JsonlLog(self.path)
        self._records = [Record.from_dict(r) for r in self._log]
        self._keys = {r.key() for r in self._records}

    def __len__(self) -> int:
        return len(self._records)

    def __iter__(self) -> Iterator[Record]:
        return iter(list(self._records))

    def __contains__(self, key: tuple[str, str, int]) -> bool:
        return key in self._keys

    @property
    def records(self) -> list[Record]:
        return list(self._records)

    def append(self, records: Iterable[Record]) -> int:
        """Append records not yet present (by key); returns how many were written."""
        new: list[Record] = []
        for record in records:
            record.validate()
            if record.key() in self._keys:
                continue
            self._keys.add(record.key())
            new.append(record)
        self._log.append_many([r.to_dict() for r in new])
        self._records.extend(new)
        return len(new)

    def loop(self, loop: int) -> list[Record]:
        return [r for r in self._records if r.loop == loop]

    def max_loop(self) -> int:
        return max((r.loop for r in self._records), default=-1)

    def content_hash(self) -> str:
        """SHA-256 of the dataset file: identifies the training data in an exported bundle."""
        digest = hashlib.sha256()
        if self.path.exists():
            with open(self.path, "rb") as handle:
                for chunk in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(chunk)
        return digest.hexdigest()


def require_labels(records: Sequence[Record], needs: str, fix: str) -> None:
    """Raise, naming ``fix``, when any of ``records`` has no gold label: ``needs`` says what reads the labels."""
    if missing := sum(r.label is None for r in records):
        raise ValueError(f"{needs}, but {missing} of {len(records)} records have no gold label (a generation task, "
                         f"or logs without one); {fix}.")


def steering_prompts(records: Sequence[Record], reach: float = STEER_REACH) -> dict[str, str]:
    """``prompt -> label`` for each prompt of ``records`` that steers the target to one label: the target's
    answers with it (``prediction``) are that label on most of its queries whatever their gold
    (:func:`~.tasks.steered_label`; a prompt scored twice on a query counts once). ``reach``
    :data:`~.tasks.LEAN_REACH` gives the prompts that *lean* the target to one label, the softer line."""
    first: dict[tuple[str, str], Record] = {}
    for record in records:
        first.setdefault((record.query_id, record.prompt), record)
    answered: dict[str, tuple[list[str | None], list[str]]] = {}
    for record in first.values():
        answers, golds = answered.setdefault(record.prompt, ([], []))
        answers.append(record.prediction)
        golds.append(str(record.label))
    steering = {prompt: steered_label(answers, golds, reach) for prompt, (answers, golds) in answered.items()}
    return {prompt: label for prompt, label in steering.items() if label is not None}
