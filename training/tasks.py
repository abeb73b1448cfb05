"""Tasks: how queries are built from records, how answers are judged, and deterministic splits.

Built-in tasks read the public files of the project's data collection. Their
location is never hard-coded: pass ``data_dir`` or set ``QPO_DATA``.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import random
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from qpo_middleware.template import Demo, Template

NUMBER_PATTERN = r"-?\d[\d,]*(?:\.\d+)?"
TaskKind = Literal["classification", "math"]


class TaskError(ValueError):
    """A task, its data files or its spec are invalid; the message names the file, line and fix."""


@dataclass(frozen=True)
class Example:
    """One query with its gold label (classification, an index into ``Task.labels``) or answer (math)."""

    id: str
    query: str
    label: int | None = None
    answer: float | None = None


SPLIT_NAMES = ("train", "collect", "test", "dev")


@dataclass(frozen=True)
class Splits:
    """Disjoint train / collect / test / dev lists of examples (no query text in two splits).

    ``dev`` (validation) is never trained on and never sampled on: settings such as which loop's
    policy to keep are chosen on it. Empty unless asked for."""

    train: list[Example]
    collect: list[Example]
    test: list[Example]
    dev: list[Example] = field(default_factory=list)

    def get(self, name: str) -> list[Example]:
        if name not in SPLIT_NAMES:
            raise TaskError(f"Unknown split {name!r}; use {', '.join(SPLIT_NAMES)}.")
        return getattr(self, name)


Loader = Callable[[Path], tuple[list[Example], list[Example]]]


@dataclass
class Task:
    """What a query is, how the target's answer is judged, and where the prompt goes.

    ``loader(data_dir)`` returns (pool, test): ``pool`` feeds train and collect,
    ``test`` is held out (empty: carved out of the pool).
    """

    name: str
    kind: TaskKind
    loader: Loader
    labels: tuple[str, ...] = ()
    answer_pattern: str = NUMBER_PATTERN
    template: Template = field(default_factory=Template)
    default_prompt: str = ""
    max_new_tokens: int = 256
    needs_data_dir: bool = True

    def __post_init__(self) -> None:
        if self.kind == "classification" and len(self.labels) < 2:
            raise TaskError(f"Task {self.name!r}: a classification task needs at least two label words.")
        if len(set(self.labels)) != len(self.labels):
            raise TaskError(f"Task {self.name!r}: label words must be distinct; got {self.labels}.")
        try:
            re.compile(self.answer_pattern)
        except re.error as exc:
            raise TaskError(f"Task {self.name!r}: answer regex {self.answer_pattern!r} is invalid: {exc}") from exc

    # -- judging -----------------------------------------------------------------

    def gold_text(self, example: Example) -> str:
        """The answer as the target should write it (a demonstration's answer)."""
        if self.kind == "classification":
            return self.labels[_require(example.label, example, "label")]
        value = _require(example.answer, example, "answer")
        return str(int(value)) if float(value).is_integer() else str(value)

    def parse(self, response: str) -> str | None:
        """Read a prediction from a free-text response: a label word or the final number."""
        if self.kind == "classification":
            best: tuple[int, str] | None = None
            for label in self.labels:
                match = re.search(rf"(?<!\w){re.escape(label)}(?!\w)", response, flags=re.IGNORECASE)
                if match and (best is None or match.start() < best[0]):
                    best = (match.start(), label)
            return best[1] if best else None
        numbers = re.findall(self.answer_pattern, response)
        return numbers[-1].replace(",", "") if numbers else None

    def is_correct(self, example: Example, prediction: str | None) -> bool:
        if prediction is None:
            return False
        if self.kind == "classification":
            return prediction.lower() == self.gold_text(example).lower()
        try:
            return abs(float(prediction) - float(_require(example.answer, example, "answer"))) < 1e-4
        except ValueError:
            return False

    # -- data ----------------------------------------------------------------------

    def splits(
        self,
        data_dir: str | os.PathLike[str] | None = None,
        *,
        seed: int = 0,
        n_train: int | None = None,
        n_collect: int | None = None,
        n_test: int | None = None,
        n_dev: int = 0,
    ) -> Splits:
        """Deterministic (by ``seed``) train / collect / test / dev splits.

        Identical query texts are merged first, test keeps precedence, so no
        query appears in two splits. ``None`` sizes take what is left: train and
        collect share the pool half and half when both are ``None``. The ``n_dev``
        dev queries come from the pool after train and collect, so asking for them
        leaves the other splits as they were (with ``n_collect=None`` collect gives
        up its last ``n_dev``).
        """
        pool, test = self.loader(resolve_data_dir(data_dir) if self.needs_data_dir else Path("."))
        rng = random.Random(seed)
        test = _dedupe(test)
        test_texts = {_norm(e.query) for e in test}
        pool = [e for e in _dedupe(pool) if _norm(e.query) not in test_texts]
        rng.shuffle(pool)
        if not test:
            take = n_test if n_test is not None else max(1, len(pool) // 5)
            test, pool = pool[:take], pool[take:]
        else:
            rng.shuffle(test)
        if n_test is not None:
            test = test[:n_test]
        if n_train is None and n_collect is None:
            n_train = len(pool) // 2
        if n_train is None:
            n_train = max(0, len(pool) - int(n_collect or 0))
        train = pool[:n_train]
        rest = pool[n_train:]
        if n_collect is None:
            n_collect_taken = max(0, len(rest) - n_dev)
            collect, dev = rest[:n_collect_taken], rest[n_collect_taken:][:n_dev]
        else:
            collect, dev = rest[:n_collect], rest[n_collect:][:n_dev]
        requested = {"train": n_train, "collect": n_collect, "test": n_test, "dev": n_dev or None}
        for name, got in (("train", train), ("collect", collect), ("test", test), ("dev", dev)):
            want = requested[name]
            if want is not None and len(got) < want:
                raise TaskError(
                    f"Task {self.name!r} has only {len(got)} examples left for the {name} split, {want} asked; "
                    f"ask for fewer (--queries / sizes) or add data."
                )
        return Splits(train=train, collect=collect, test=test, dev=dev)

    def demos_for(self, example: Example, train: Sequence[Example], k: int, seed: int = 0) -> tuple[Demo, ...]:
        """``k`` demonstrations from ``train``, fixed per (query, seed) so every method sees the same ones."""
        if k <= 0:
            return ()
        candidates = [e for e in train if e.id != example.id and e.query != example.query]
        if len(candidates) < k:
            raise TaskError(f"Task {self.name!r}: {k} demonstrations asked but only {len(candidates)} train examples.")
        digest = hashlib.sha256(f"{seed}:{example.id}".encode()).digest()
        rng = random.Random(int.from_bytes(digest[:8], "big"))
        return tuple(Demo(query=e.query, answer=self.gold_text(e)) for e in rng.sample(candidates, k))

    def prompt_pool(self) -> list[dict[str, str]]:
        """The task's built-in prompt pool: ``[{"id", "style", "text"}, ...]``."""
        return load_prompt_pool(self.name)


def names_labels(text: str, labels: Sequence[str]) -> set[str]:
    """The label words ``text`` names (whole words, any case). A prompt naming exactly one of a task's
    labels ("the answer is positive") leans the answer rather than instructing: the benchmarks' leakage
    check counts such prompts, and induction drops them."""
    lowered = text.lower()
    return {label for label in labels
            if re.search(rf"(?<![a-z0-9]){re.escape(label.lower())}(?![a-z0-9])", lowered)}


def names_one_label(text: str, labels: Sequence[str]) -> bool:
    """Whether ``text`` names exactly one of ``labels`` (see :func:`names_labels`): the leakage check's test."""
    return len(names_labels(text, labels)) == 1


STEER_REACH = 0.5
"""How far from its share of the golds toward always a prompt must answer one label to steer the target there."""

LEAN_REACH = 1 / 3
"""The same for a prompt that *leans* the target to one label (4 balanced labels: 50% of the queries; 2: 66.7%): a
softer line than steering, reported beside it so readers see how much of a router's gain rides on leaning prompts."""


def steered_label(answers: Sequence[str | None], golds: Sequence[str], reach: float = STEER_REACH) -> str | None:
    """The label a prompt steers the target to, judged by its answers on queries whose gold labels are known: the
    label it answers at least halfway between that label's share of the golds and always (4 balanced labels:
    62.5% of the queries; 2 balanced: 75%), or None. The behavioural leakage check: a prompt that makes the target
    answer one label whatever the query does what naming the label does, though it may name none or all of them
    (e.g. SmolLM2 answers the first label a list names). ``reach`` moves the line: the fraction of the way from the
    gold share to always (:data:`LEAN_REACH` for the softer *leans* check)."""
    if not 0.0 < reach <= 1.0:
        raise ValueError(f"reach must be in (0, 1]; got {reach}.")
    if len(answers) != len(golds):
        raise ValueError(f"steered_label got {len(answers)} answers for {len(golds)} gold labels.")
    if not golds:
        return None
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return None
    label, n = counts.most_common(1)[0]
    gold_share = sum(g == label for g in golds) / len(golds)
    return label if n / len(answers) >= gold_share + reach * (1 - gold_share) else None


def _require(value: Any, example: Example, name: str) -> Any:
    if value is None:
        raise TaskError(f"Example {example.id!r} has no gold {name}.")
    return value


def _norm(text: str) -> str:
    return " ".join(text.split()).lower()


def _dedupe(examples: list[Example]) -> list[Example]:
    seen: set[str] = set()
    out: list[Example] = []
    for example in examples:
        key = _norm(example.query)
        if key and key not in seen:
            seen.add(key)
            out.append(example)
    return out


# -- data location and prompt pools ----------------------------------------------------------


def resolve_data_dir(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """The data collection's root: ``data_dir``, else ``$QPO_DATA``; a clear error when neither is set."""
    value = data_dir or os.environ.get("QPO_DATA")
    if not value:
        raise TaskError(
            "Built-in tasks read the public data collection (folders sst2/, ag_news/, ...). "
            "Pass --data-dir PATH or set QPO_DATA=PATH (in this repository: ../shared/data)."
        )
    path = Path(value).expanduser()
    if not path.is_dir():
        raise TaskError(f"Data directory {path} does not exist; pass --data-dir or set QPO_DATA to the data folder.")
    return path


def load_prompt_pool(name: str) -> list[dict[str, str]]:
    try:
        text = resources.files("qpo_middleware.training").joinpath("prompts", f"{name}.json").read_text("utf-8")
    except FileNotFoundError as exc:
        raise TaskError(
            f"No built-in prompt pool for task {name!r}; pass your own with --prompts FILE (JSON list of strings)."
        ) from exc
    prompts = json.loads(text)["prompts"]
    return [{"id": p["id"], "style": p.get("style", ""), "text": p["text"]} for p in prompts]


def resolve_prompts(task: Task, spec: str, include_empty: bool) -> list[tuple[str, str]]:
    """(prompt_source, text) for the pool: 'all', a count, a JSON file (list of strings or of {id, text}),
    or 'none' (no given prompts: only the empty one, with ``include_empty``, and any induced ones)."""
    if spec == "none":
        pool: list[tuple[str, str]] = []
    elif spec == "all" or spec.isdigit():
        pool = [(f"pool:{p['id']}", p["text"]) for p in load_prompt_pool(task.name)]
        if spec.isdigit():  # N prompts spread evenly over the pool, so every style is represented
            count = min(int(spec), len(pool))
            pool = [pool[i * len(pool) // count] for i in range(count)] if count else []
    else:
        path = Path(spec)
        try:
            items = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise TaskError(f"--prompts {spec!r}: expected 'all', a number, 'none', 'induce:N', or a JSON file of "
                            f"prompts ({exc}).") from exc
        if isinstance(items, dict):
            items = items.get("prompts", [])
        pool = []
        for index, item in enumerate(items):
            if isinstance(item, str):
                pool.append((f"file:{index}", item))
            elif isinstance(item, dict) and isinstance(item.get("text"), str):
                pool.append((f"file:{item.get('id', index)}", item["text"]))
            else:
                raise TaskError(f"{path}: prompt #{index} must be a string or an object with 'text'.")
    if include_empty:
        pool.insert(0, ("none", ""))
    if not pool and spec != "none":
        raise TaskError("The prompt pool is empty; pass --prompts all or a file with prompts.")
    return pool


# -- readers ---------------------------------------------------------------------------------


def _read_rows(path: Path, delimiter: str, header: bool = True) -> list[list[str]]:
    if not path.is_file():
        raise TaskError(f"Data file {path} is missing; check --data-dir / QPO_DATA.")
    with open(path, encoding="utf-8", newline="") as handle:
        rows = [[cell.rstrip("\r") for cell in row] for row in csv.reader(handle, delimiter=delimiter)]
    rows = [r for r in rows if r and any(c.strip() for c in r)]
    return rows[1:] if header else rows


def _sentence_label_tsv(path: Path, prefix: str) -> list[Example]:
    # GLUE-style TSVs are not quoted: split on the last tab instead of using csv quoting.
    if not path.is_file():
        raise TaskError(f"Data file {path} is missing; check --data-dir / QPO_DATA.")
    examples = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines[1:], start=2):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        sentence, _, label = line.rpartition("\t")
        if label.strip() not in ("0", "1"):
            raise TaskError(f"{path}:{number}: label must be 0 or 1; got {label!r}.")
        examples.append(Example(id=f"{prefix}-{number}", query=sentence.strip(), label=int(label)))
    return examples


def _load_sst2(root: Path) -> tuple[list[Example], list[Example]]:
    base = root / "sst2"
    pool = _sentence_label_tsv(base / "train_full.tsv", "sst2-train")
    pool += _sentence_label_tsv(base / "dev.tsv", "sst2-dev")
    return pool, _sentence_label_tsv(base / "test-labeled.tsv", "sst2-test")


def _load_mr_cr(name: str) -> Loader:
    def load(root: Path) -> tuple[list[Example], list[Example]]:
        return _sentence_label_tsv(root / "mr_cr" / name / "test.tsv", name), []

    return load


AG_LABELS = ("World", "Sports", "Business", "Technology")
_AG_NAME_TO_INDEX = {"World": 0, "Sports": 1, "Business": 2, "Sci/Tech": 3}


def _load_ag_news(root: Path) -> tuple[list[Example], list[Example]]:
    base = root / "ag_news"
    pool = []
    for number, row in enumerate(_read_rows(base / "train_subset_alps_dev.tsv", "\t", header=False), start=1):
        if len(row) != 2 or row[1] not in _AG_NAME_TO_INDEX:
            raise TaskError(f"{base / 'train_subset_alps_dev.tsv'}:{number}: expected 'description<TAB>label name'.")
        pool.append(Example(id=f"ag-train-{number}", query=row[0].strip(), label=_AG_NAME_TO_INDEX[row[1]]))
    test = []
    for number, row in enumerate(_read_rows(base / "test.csv", ","), start=2):
        # Train descriptions carry no title, so test queries use the description too (like for like).
        test.append(Example(id=f"ag-test-{number}", query=row[2].replace("\\", " ").strip(), label=int(row[0]) - 1))
    return pool, test


EMOTION_LABELS = ("anger", "joy", "optimism", "sadness")


def _load_tweet_emotion(root: Path) -> tuple[list[Example], list[Example]]:
    base = root / "tweet_eval_emotion"

    def read(split: str) -> list[Example]:
        texts = (base / f"{split}_text.txt").read_text(encoding="utf-8").splitlines()
        labels = (base / f"{split}_labels.txt").read_text(encoding="utf-8").splitlines()
        if len(texts) != len(labels):
            raise TaskError(f"{base}: {split}_text.txt and {split}_labels.txt differ in length.")
        return [Example(id=f"emo-{split}-{i}", query=t.strip(), label=int(y)) for i, (t, y) in enumerate(zip(texts, labels, strict=True))]

    return read("train") + read("val"), read("test")


def _load_gsm8k(root: Path) -> tuple[list[Example], list[Example]]:
    def read(split: str) -> list[Example]:
        out = []
        path = root / "gsm8k" / f"{split}.jsonl"
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            row = json.loads(line)
            answer = row["answer"].rsplit("####", 1)[-1].strip().replace(",", "")
            out.append(Example(id=f"gsm8k-{split}-{number}", query=row["question"].strip(), answer=float(answer)))
        return out

    return read("train"), read("test")


def _load_svamp(root: Path) -> tuple[list[Example], list[Example]]:
    rows = json.loads((root / "svamp" / "SVAMP.json").read_text(encoding="utf-8"))
    examples = [
        Example(id=f"svamp-{r['ID']}", query=f"{r['Body'].strip()} {r['Question'].strip()}", answer=float(r["Answer"]))
        for r in rows
    ]
    return examples, []


def _load_quickstart_sample(_: Path) -> tuple[list[Example], list[Example]]:
    text = resources.files("qpo_middleware.training").joinpath("sample", "sst2_sample.tsv").read_text("utf-8")
    pool, test = [], []
    for number, row in enumerate(csv.reader(text.splitlines()[1:], delimiter="\t"), start=2):
        example = Example(id=f"sample-{number}", query=row[0], label=int(row[1]))
        (test if row[2] == "test" else pool).append(example)
    return pool, test


_SENTIMENT = ("negative", "positive")
_MATH_TEMPLATE = Template(placement="before", demo_format="Question: {query}\nAnswer: {answer}")

BUILTIN_TASKS: dict[str, Callable[[], Task]] = {
    "sst2": lambda: Task("sst2", "classification", _load_sst2, labels=_SENTIMENT,
                         default_prompt="Is the sentiment of this movie review positive or negative?"),
    "mr": lambda: Task("mr", "classification", _load_mr_cr("mr"), labels=_SENTIMENT,
                       default_prompt="Is the sentiment of this movie review positive or negative?"),
    "cr": lambda: Task("cr", "classification", _load_mr_cr("cr"), labels=_SENTIMENT,
                       default_prompt="Is the sentiment of this product review positive or negative?"),
    "ag_news": lambda: Task("ag_news", "classification", _load_ag_news, labels=AG_LABELS,
                            default_prompt="What is the topic of this news article: World, Sports, Business or Technology?"),
    "tweet_emotion": lambda: Task("tweet_emotion", "classification", _load_tweet_emotion, labels=EMOTION_LABELS,
                                  default_prompt="Which emotion does this tweet express: anger, joy, optimism or sadness?"),
    "gsm8k": lambda: Task("gsm8k", "math", _load_gsm8k, template=_MATH_TEMPLATE,
                          default_prompt="Solve the problem step by step, then give the final number."),
    "svamp": lambda: Task("svamp", "math", _load_svamp, template=_MATH_TEMPLATE,
                          default_prompt="Solve the problem step by step, then give the final number."),
    # The small SST-2 sample shipped in the package for `qpo quickstart` (no data dir needed).
    "sst2_sample": lambda: Task("sst2", "classification", _load_quickstart_sample, labels=_SENTIMENT,
                                default_prompt="Is the sentiment of this movie review positive or negative?",
                                needs_data_dir=False),
}


# -- user tasks ------------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskSpec:
    """A user task from a JSONL / CSV / TSV file.

    ``label_field`` values may be label words (from ``labels``) or 0-based
    indices. Math tasks give ``answer_field`` (a number) instead. A ``split``
    column with ``test`` marks held-out rows; the rest feed train and collect.
    """

    name: str
    file: str
    query_fields: tuple[str, ...]
    kind: TaskKind = "classification"
    label_field: str | None = "label"
    labels: tuple[str, ...] = ()
    answer_field: str | None = None
    answer_pattern: str = NUMBER_PATTERN
    query_joiner: str = "\n"
    split_field: str | None = "split"
    default_prompt: str = ""
    placement: str = "before"

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> TaskSpec:
        """Read a JSON spec; relative ``file`` paths resolve against the spec's folder."""
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise TaskError(f"Cannot read task spec {path}: {exc}") from exc
        if not isinstance(data, dict):
            raise TaskError(f"Task spec {path} must be a JSON object.")
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise TaskError(f"Task spec {path}: unknown field(s) {sorted(unknown)}; known: {sorted(known)}.")
        for key in ("name", "file", "query_fields"):
            if key not in data:
                raise TaskError(f"Task spec {path}: missing required field {key!r}.")
        data["query_fields"] = tuple([data["query_fields"]] if isinstance(data["query_fields"], str) else data["query_fields"])
        data["labels"] = tuple(data.get("labels", ()))
        file = Path(data["file"])
        data["file"] = str(file if file.is_absolute() else path.parent / file)
        return cls(**data)

    def to_task(self) -> Task:
        return Task(
            name=self.name,
            kind=self.kind,
            loader=lambda _: _load_user_file(self),
            labels=self.labels,
            answer_pattern=self.answer_pattern,
            template=Template(placement=self.placement),  # type: ignore[arg-type]
            default_prompt=self.default_prompt,
            needs_data_dir=False,
        )


def _iter_user_rows(path: Path) -> list[tuple[int, dict[str, Any]]]:
    if not path.is_file():
        raise TaskError(f"Task data file {path} does not exist.")
    suffix = path.suffix.lower()
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise TaskError(f"{path}: not valid UTF-8 ({exc}); re-save the file as UTF-8.") from exc
    if suffix in (".jsonl", ".ndjson"):
        rows = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise TaskError(f"{path}:{number}: invalid JSON ({exc.msg}); each line must be one JSON object.") from exc
            if not isinstance(row, dict):
                raise TaskError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}.")
            rows.append((number, row))
        return rows
    if suffix in (".csv", ".tsv"):
        reader = csv.DictReader(text.splitlines(), delimiter="\t" if suffix == ".tsv" else ",")
        return [(number, dict(row)) for number, row in enumerate(reader, start=2)]
    raise TaskError(f"{path}: unsupported file type {suffix!r}; use .jsonl, .csv or .tsv.")


def _load_user_file(spec: TaskSpec) -> tuple[list[Example], list[Example]]:
    path = Path(spec.file)
    pool: list[Example] = []
    test: list[Example] = []
    for number, row in _iter_user_rows(path):
        where = f"{path}:{number}"
        parts = []
        for name in spec.query_fields:
            if name not in row or row[name] is None:
                raise TaskError(f"{where}: missing query field {name!r} (fields: {sorted(row)}).")
            parts.append(str(row[name]))
        query = spec.query_joiner.join(parts)
        if not query.strip():
            raise TaskError(f"{where}: the query is empty.")
        label: int | None = None
        answer: float | None = None
        if spec.kind == "classification":
            label = _parse_label(row.get(spec.label_field or ""), spec, where)
        else:
            raw = row.get(spec.answer_field or "")
            try:
                answer = float(str(raw).replace(",", ""))
            except ValueError as exc:
                raise TaskError(f"{where}: answer field {spec.answer_field!r} must be a number; got {raw!r}.") from exc
        example = Example(id=f"{spec.name}-{number}", query=query, label=label, answer=answer)
        is_test = spec.split_field and str(row.get(spec.split_field, "")).strip().lower() == "test"
        (test if is_test else pool).append(example)
    if not pool and not test:
        raise TaskError(f"{path}: no rows.")
    return pool, test


def _parse_label(raw: Any, spec: TaskSpec, where: str) -> int:
    if raw is None:
        raise TaskError(f"{where}: missing label field {spec.label_field!r}.")
    text = str(raw).strip()
    if text in spec.labels:
        return spec.labels.index(text)
    if text.lstrip("-").isdigit() and 0 <= int(text) < len(spec.labels):
        return int(text)
    raise TaskError(f"{where}: label {text!r} is neither one of {list(spec.labels)} nor an index 0..{len(spec.labels) - 1}.")


def get_task(name_or_spec: str) -> Task:
    """A built-in task by name, or a user task from a ``*.json`` spec file."""
    if name_or_spec in BUILTIN_TASKS:
        return BUILTIN_TASKS[name_or_spec]()
    if name_or_spec.endswith(".json") and Path(name_or_spec).is_file():
        return TaskSpec.from_file(name_or_spec).to_task()
    raise TaskError(
        f"Unknown task {name_or_spec!r}. Built-in: {', '.join(sorted(BUILTIN_TASKS))}; "
        "or pass a task spec file (task.json with name, file, query_fields, label_field, labels)."
    )
