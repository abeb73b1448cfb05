"""Import the Prompt-OIRL offline prompting logs as a QPO offline dataset (loop 0).

The logs (``<data_dir>/prompt_oirl/``, described in its ``SOURCE.md``) record whether
LLaMA-2-7B-chat answered a math word problem correctly with each of 6 training
prompts (and, on the test portion, 10 held-out GPT-4-written prompts). They are
per-(query, prompt) correctness labels, i.e. exactly what ``qpo collect`` measures,
so they import as D0 records without calling any model.

How the model was prompted: a single user turn ``question + prompt``, concatenated
with no separator; the prompt is a suffix instruction. That is :data:`OIRL_TEMPLATE`
(``Template(placement="after", separator="")``). GSM8K questions had ``"\\n"``
appended before the prompt (so for GSM8K the exact user turn is
``Template(placement="after", separator="\\n")``); the imported query text is the
question without that newline, identical to the query of our ``gsm8k`` task.

Datasets and ids:

* ``gsm8k`` -> task ``gsm8k``, query ids ``gsm8k-train-<line>`` / ``gsm8k-test-<line>``
  (1-based lines of ``gsm8k/{train,test}.jsonl``, as in :mod:`.tasks`). Train = all
  7,473 train questions (6 base prompts); test = the first 1,000 test questions
  (all 16 prompts). No duplication.
* ``svamp`` / ``mawps`` -> task ``oirl_svamp`` / ``oirl_mawps``, query ids
  ``oirl-svamp-q<qid>`` / ``oirl-mawps-q<qid>``. These pools repeat each distinct
  question (``qid``) several times, and Prompt-OIRL's own train/test split leaks
  questions. The import splits by ``qid`` instead: ``test`` = qids with a row in
  Prompt-OIRL's test part, ``train`` = the other qids (all their rows are in the train
  part). Repeated occurrences are independent sampled runs: a record's ``correct`` is
  ``mean >= 0.5`` over the qid's occurrences that ran the prompt, with the mean in
  ``extra["p_correct"]`` and the count in ``extra["n"]``.

``prompt_mean_accuracy`` is the prompt's mean ``correct`` over the imported queries
(after any ``max_queries`` subsample), so it equals what one recomputes from the
records; ``reward`` follows :class:`~.config.RewardConfig` with no NLL (the logs hold
no model outputs).
"""

from __future__ import annotations

import csv
import json
import logging
import os
import random
from collections import Counter, defaultdict
from collections.abc import Collection, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from qpo_middleware.template import Template

from .config import RewardConfig
from .dataset import OfflineDataset, Record
from .run import ImportedLogs, RunPaths

logger = logging.getLogger(__name__)

OIRL_TEMPLATE = Template(placement="after", separator="")
"""How Prompt-OIRL applied a prompt: ``question + prompt`` with no separator (a suffix)."""
GSM8K_TEMPLATE = Template(placement="after", separator="\n")
"""GSM8K questions had ``"\\n"`` appended before the prompt: ``question + "\\n" + prompt``."""


def logged_template(dataset: str) -> Template:
    """How the logged model was given the prompt and the query for ``dataset``."""
    return GSM8K_TEMPLATE if dataset == "gsm8k" else OIRL_TEMPLATE

OIRL_TARGET = "oirl:llama-2-7b-chat"
DATASETS: dict[str, str] = {"gsm8k": "gsm8k", "svamp": "oirl_svamp", "mawps": "oirl_mawps"}
SPLITS = ("train", "test", "all")
PROMPT_CHOICES = ("base", "all")
BASE_ALIASES = ("nan", "CoT", "APE", "Dis", "ToT", "Decomp")

_FIX_DATA = "pass --data-dir PATH or set QPO_DATA=PATH to the data collection root (in this repository: ../shared/data)"


class OirlImportError(ValueError):
    """The Prompt-OIRL files are missing or malformed, or an argument is invalid; the message names the fix."""


@dataclass
class ImportSummary:
    """What an import read and wrote; accuracies are over the imported queries (after subsampling)."""

    dataset: str
    task: str
    split: str
    queries: int
    prompts: list[str]
    records_written: int
    dataset_records: int
    accuracy: dict[str, float]
    pairs: dict[str, int]
    best_prompt: str
    best_accuracy: float
    oracle_accuracy: float
    template: Template = field(default_factory=lambda: OIRL_TEMPLATE)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Query:
    """One distinct question with its per-prompt outcomes (lists of 0/1 over occurrences)."""

    query_id: str
    text: str
    label: str
    outcomes: dict[str, list[int]]
    oirl_split: str
    extra: dict[str, Any] = field(default_factory=dict)


# -- public entry point ------------------------------------------------------------------------


def import_prompt_oirl(
    data_dir: str | os.PathLike[str] | None,
    dataset: str,
    out_dir: str | os.PathLike[str],
    *,
    split: str = "train",
    prompts: str = "base",
    max_queries: int | None = None,
    seed: int = 0,
    rewards: RewardConfig | None = None,
    query_ids: Collection[str] | None = None,
) -> ImportSummary:
    """Append the Prompt-OIRL records of ``dataset``/``split`` to ``OfflineDataset(out_dir)``.

    ``data_dir`` is the data collection root (holding ``prompt_oirl/`` and ``gsm8k/``;
    the ``prompt_oirl`` folder itself is accepted too; ``None`` reads ``$QPO_DATA``).
    ``prompts`` is ``"base"`` (the 6 training prompts) or ``"all"`` (the 16, where a
    query has them: the GPT-4 prompts ran only on the test portion). ``max_queries``
    keeps a deterministic ``random.Random(seed)`` sample of the distinct queries; ``query_ids``
    keeps only those queries first (a train/dev split made by the caller), and the prompts'
    mean accuracies are then over the kept queries alone.
    Re-running appends nothing new (records are keyed by query id, prompt and loop).
    """
    if dataset not in DATASETS:
        raise OirlImportError(f"Unknown Prompt-OIRL dataset {dataset!r}; use one of {', '.join(DATASETS)}.")
    if split not in SPLITS:
        raise OirlImportError(f"Unknown split {split!r}; use train, test or all.")
    if prompts not in PROMPT_CHOICES:
        raise OirlImportError(
            f"Unknown prompts choice {prompts!r}; use 'base' (the 6 training prompts) or 'all' (all 16)."
        )
    if max_queries is not None and max_queries < 1:
        raise OirlImportError(f"max_queries must be >= 1 (or omitted for all queries); got {max_queries}.")
    rewards = rewards or RewardConfig()

    root = resolve_oirl_root(data_dir)
    oirl = root / "prompt_oirl"
    texts = load_prompt_texts(oirl)
    aliases = [a for a in texts if prompts == "all" or a in BASE_ALIASES]

    if dataset == "gsm8k":
        queries = _gsm8k_queries(root, split, aliases)
    else:
        queries = _pool_queries(oirl, dataset, split, aliases)
    if query_ids is not None:
        wanted = set(query_ids)
        queries = [q for q in queries if q.query_id in wanted]
    if max_queries is not None and max_queries < len(queries):
        keep = set(random.Random(seed).sample(range(len(queries)), max_queries))
        queries = [q for i, q in enumerate(queries) if i in keep]
    if not queries:
        raise OirlImportError(
            f"No {dataset} queries in split {split!r}; check the files under {oirl / 'derived'}."
        )

    present = [a for a in aliases if any(a in q.outcomes for q in queries)]
    if len(present) < len(aliases):
        logger.info(
            "Prompts not run on %s/%s (skipped): %s",
            dataset,
            split,
            ", ".join(a for a in aliases if a not in present),
        )

    correct = {
        (q.query_id, a): _mean(q.outcomes[a]) >= 0.5 for q in queries for a in present if a in q.outcomes
    }
    hits: dict[str, list[bool]] = defaultdict(list)
    for (_, alias), value in correct.items():
        hits[alias].append(value)
    accuracy = {a: sum(hits[a]) / len(hits[a]) for a in present}

    task = DATASETS[dataset]
    records: list[Record] = []
    for q in queries:
        for alias in present:
            if alias not in q.outcomes:
                continue
            ok = correct[(q.query_id, alias)]
            extra = dict(q.extra)
            if dataset != "gsm8k":
                extra.update(p_correct=_mean(q.outcomes[alias]), n=len(q.outcomes[alias]), split=q.oirl_split)
            records.append(
                Record(
                    task=task,
                    query_id=q.query_id,
                    query=q.text,
                    prompt=texts[alias],
                    prompt_source=f"oirl:{alias}",
                    loop=0,
                    target=OIRL_TARGET,
                    correct=ok,
                    reward=rewards.reward(ok, accuracy[alias], None),
                    prompt_mean_accuracy=accuracy[alias],
                    label=q.label,
                    extra=extra,
                )
            )

    store = OfflineDataset(out_dir)
    written = store.append(records)
    # What lets `qpo train --loops 1` run on the import: the task, the logged model and its template.
    ImportedLogs(source=f"prompt_oirl/{dataset}/{split}", task=task, target=OIRL_TARGET,
                 template=logged_template(dataset)).write(RunPaths(out_dir))
    oracle = sum(any(correct.get((q.query_id, a), False) for a in present) for q in queries) / len(queries)
    best = max(present, key=lambda a: accuracy[a])
    logger.info(
        "Imported Prompt-OIRL %s/%s: %d queries x %d prompts, %d new records (%d in %s)",
        dataset,
        split,
        len(queries),
        len(present),
        written,
        len(store),
        store.path,
    )
    return ImportSummary(
        dataset=dataset,
        task=task,
        split=split,
        queries=len(queries),
        prompts=present,
        records_written=written,
        dataset_records=len(store),
        accuracy=accuracy,
        pairs={a: len(hits[a]) for a in present},
        best_prompt=best,
        best_accuracy=accuracy[best],
        oracle_accuracy=oracle,
        template=logged_template(dataset),
    )


# -- files ---------------------------------------------------------------------------------------


def resolve_oirl_root(data_dir: str | os.PathLike[str] | None) -> Path:
    """The data collection root holding ``prompt_oirl/``; clear errors when it is not there."""
    value = data_dir if data_dir is not None else os.environ.get("QPO_DATA")
    if not value:
        raise OirlImportError(f"No data directory given; {_FIX_DATA}.")
    path = Path(value).expanduser()
    if path.name == "prompt_oirl" and (path / "derived").is_dir():
        path = path.parent
    if not path.is_dir():
        raise OirlImportError(f"Data directory {path} does not exist; {_FIX_DATA}.")
    if not (path / "prompt_oirl" / "derived").is_dir():
        raise OirlImportError(
            f"{path} has no prompt_oirl/derived/ folder (the Prompt-OIRL logs); {_FIX_DATA}."
        )
    return path


def load_prompt_texts(oirl: Path) -> dict[str, str]:
    """alias -> exact prompt text from ``prompts.json``, in its order (the 6 base prompts first)."""
    path = oirl / "prompts.json"
    try:
        items = json.loads(path.read_text(encoding="utf-8"))["prompts"]
        texts = {str(p["alias"]): str(p["text"]) for p in items}
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise OirlImportError(f"Cannot read the prompt list {path}: {exc}; {_FIX_DATA}.") from exc
    missing = [a for a in BASE_ALIASES if a not in texts]
    if missing:
        raise OirlImportError(
            f"{path} lacks the base prompt(s) {missing}; the file is not Prompt-OIRL's prompt list."
        )
    return texts


def _read_csv(path: Path, first_column: str, aliases: Sequence[str]) -> list[dict[str, str]]:
    if not path.is_file():
        raise OirlImportError(f"Missing Prompt-OIRL table {path}; {_FIX_DATA}.")
    with open(path, encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        columns = set(reader.fieldnames or ())
        rows = list(reader)
    needed = {first_column, *BASE_ALIASES}
    if not needed <= columns:
        raise OirlImportError(f"{path}: missing column(s) {sorted(needed - columns)}.")
    for number, row in enumerate(rows, start=2):
        for alias in aliases:
            if row.get(alias) not in ("0", "1", "", None):
                raise OirlImportError(
                    f"{path}:{number}: column {alias!r} must be 0, 1 or empty; got {row[alias]!r}."
                )
    return rows


def _outcomes(row: dict[str, str], aliases: Sequence[str]) -> dict[str, int]:
    return {a: int(row[a]) for a in aliases if row.get(a)}


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise OirlImportError(f"Missing question file {path}; {_FIX_DATA}.")
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise OirlImportError(f"{path}:{number}: invalid JSON ({exc.msg}).") from exc
    return rows


def _gsm8k_queries(root: Path, split: str, aliases: Sequence[str]) -> list[_Query]:
    queries: list[_Query] = []
    for part in ("train", "test") if split == "all" else (split,):
        questions = _read_jsonl(root / "gsm8k" / f"{part}.jsonl")
        table = root / "prompt_oirl" / "derived" / f"gsm8k_{part}_correctness.csv"
        for row in _read_csv(table, f"{part}_idx", aliases):
            idx = int(row[f"{part}_idx"])
            if idx >= len(questions):
                raise OirlImportError(f"{table}: {part}_idx {idx} is past the end of gsm8k/{part}.jsonl.")
            question = questions[idx]
            label = str(question["answer"]).rsplit("####", 1)[-1].strip().replace(",", "")
            queries.append(
                _Query(
                    query_id=f"gsm8k-{part}-{idx + 1}",
                    text=question["question"],
                    label=label,
                    outcomes={a: [v] for a, v in _outcomes(row, aliases).items()},
                    oirl_split=part,
                )
            )
    return queries


def _pool_queries(oirl: Path, dataset: str, split: str, aliases: Sequence[str]) -> list[_Query]:
    table = oirl / "derived" / f"{dataset}_correctness.csv"
    rows = _read_csv(table, "qid", aliases)
    questions = _read_jsonl(oirl / "derived" / f"{dataset}_questions.jsonl")
    if len(rows) != len(questions):
        raise OirlImportError(
            f"{table} has {len(rows)} rows but {dataset}_questions.jsonl has {len(questions)}."
        )

    order: list[int] = []
    texts: dict[int, str] = {}
    answers: dict[int, list[str]] = defaultdict(list)
    parts: dict[int, set[str]] = defaultdict(set)
    outcomes: dict[int, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    for number, (row, question) in enumerate(zip(rows, questions, strict=True), start=2):
        qid = int(row["qid"])
        if int(row["log_idx"]) != question["log_idx"] or qid != question["qid"]:
            raise OirlImportError(
                f"{table}:{number}: log_idx/qid do not match line {number - 1} of the questions file."
            )
        if qid not in texts:
            order.append(qid)
            texts[qid] = question["question"]
        answers[qid].append(str(question["answer"]))
        parts[qid].add(row["split"])
        for alias, value in _outcomes(row, aliases).items():
            outcomes[qid][alias].append(value)

    queries = []
    conflicts = 0
    for qid in order:
        oirl_split = "test" if "test" in parts[qid] else "train"
        if split != "all" and oirl_split != split:
            continue
        extra: dict[str, Any] = {}
        if len({_number(a) for a in answers[qid]}) > 1:
            conflicts += 1
            extra["answers"] = sorted(set(answers[qid]))
        label = Counter(answers[qid]).most_common(1)[0][0]  # ties: first seen
        queries.append(
            _Query(
                query_id=f"oirl-{dataset}-q{qid}",
                text=texts[qid],
                label=label,
                outcomes=dict(outcomes[qid]),
                oirl_split=oirl_split,
                extra=extra,
            )
        )
    if conflicts:
        logger.warning(
            "%d %s question(s) have conflicting gold answers across occurrences; "
            "the most common is the label, all are in extra['answers'].",
            conflicts,
            dataset,
        )
    return queries


def _number(text: str) -> float | str:
    try:
        return float(text)
    except ValueError:
        return text


def _mean(values: Sequence[int]) -> float:
    return sum(values) / len(values)
