"""Build the small SST-2 quickstart sample shipped in ``training/sample/``.

Usage::

    python benchmarks/make_quickstart_sample.py --data-dir /work/shared/data

Reads ``<data-dir>/sst2/train_full.tsv`` and ``<data-dir>/sst2/test-labeled.tsv`` and writes
``training/sample/sst2_sample.tsv`` (columns ``sentence``, ``label``, ``split``):

* 400 ``train`` rows from ``train_full.tsv``, 200 per label, only sentences of at least 4 words;
* 200 ``test`` rows from ``test-labeled.tsv``, 100 per label.

Sentences are whitespace-stripped (which also removes the CRLF ``\\r`` of the test file). A
sentence appears at most once in the output: duplicates inside a file are collapsed (sentences
that carry both labels are dropped), and training sentences that also occur in the test file are
not eligible for the train split. Sampling uses a single ``random.Random(0)``; candidates are
kept in file order and drawn with ``rng.sample``: train negative, train positive, test negative,
test positive, in that order. The output is deterministic.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

SEED = 0
TRAIN_PER_LABEL = 200
TEST_PER_LABEL = 100
MIN_TRAIN_WORDS = 4
LABELS = ("0", "1")

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "training" / "sample" / "sst2_sample.tsv"


def read_tsv(path: Path) -> list[tuple[str, str]]:
    """Read a ``sentence<TAB>label`` file (header skipped); strip whitespace and ``\\r``."""
    rows: list[tuple[str, str]] = []
    with path.open(encoding="utf-8", newline="") as fh:
        lines = fh.read().split("\n")
    header = lines[0].rstrip("\r").split("\t")
    if header != ["sentence", "label"]:
        raise ValueError(f"{path}: unexpected header {header!r}")
    for lineno, raw in enumerate(lines[1:], start=2):
        line = raw.rstrip("\r")
        if not line.strip():
            continue
        sentence, sep, label = line.rpartition("\t")
        if not sep or label not in LABELS:
            raise ValueError(f"{path}:{lineno}: malformed row {line!r}")
        rows.append((sentence.strip(), label))
    return rows


def unique_by_label(rows: list[tuple[str, str]]) -> dict[str, list[str]]:
    """Group sentences by label in file order; collapse repeats, drop label-conflicting ones."""
    labels_of: dict[str, set[str]] = {}
    order: list[str] = []
    for sentence, label in rows:
        if sentence not in labels_of:
            labels_of[sentence] = set()
            order.append(sentence)
        labels_of[sentence].add(label)
    grouped: dict[str, list[str]] = {label: [] for label in LABELS}
    for sentence in order:
        labels = labels_of[sentence]
        if len(labels) == 1:
            grouped[next(iter(labels))].append(sentence)
    return grouped


def build_sample(data_dir: Path) -> list[tuple[str, str, str]]:
    sst2 = data_dir / "sst2"
    train_rows = read_tsv(sst2 / "train_full.tsv")
    test_rows = read_tsv(sst2 / "test-labeled.tsv")
    test_sentences = {sentence for sentence, _ in test_rows}

    train_rows = [
        (sentence, label)
        for sentence, label in train_rows
        if len(sentence.split()) >= MIN_TRAIN_WORDS and sentence not in test_sentences
    ]
    train_by_label = unique_by_label(train_rows)
    test_by_label = unique_by_label(test_rows)

    rng = random.Random(SEED)
    out: list[tuple[str, str, str]] = []
    for split, grouped, per_label in (
        ("train", train_by_label, TRAIN_PER_LABEL),
        ("test", test_by_label, TEST_PER_LABEL),
    ):
        for label in LABELS:
            for sentence in rng.sample(grouped[label], per_label):
                out.append((sentence, label, split))

    sentences = [sentence for sentence, _, _ in out]
    if len(set(sentences)) != len(sentences):
        raise AssertionError("duplicate sentence in sample")
    return out


def write_sample(rows: list[tuple[str, str, str]], out_path: Path) -> None:
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with out_path.open("w", encoding="utf-8", newline="\n") as fh:
        fh.write("sentence\tlabel\tsplit\n")
        for sentence, label, split in rows:
            fh.write(f"{sentence}\t{label}\t{split}\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, required=True, help="folder holding sst2/")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output TSV path")
    args = parser.parse_args(argv)
    rows = build_sample(args.data_dir)
    write_sample(rows, args.out)
    counts: dict[tuple[str, str], int] = {}
    for _, label, split in rows:
        counts[(split, label)] = counts.get((split, label), 0) + 1
    print(f"wrote {len(rows)} rows to {args.out}: {dict(sorted(counts.items()))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
