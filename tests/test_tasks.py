from __future__ import annotations

import json
from pathlib import Path

import pytest

from qpo_middleware.training.tasks import BUILTIN_TASKS, TaskError, TaskSpec, get_task, resolve_data_dir


@pytest.mark.parametrize("name", [n for n in BUILTIN_TASKS if n != "sst2_sample"])
def test_builtin_splits_are_disjoint_and_deterministic(name: str, real_data: Path) -> None:
    task = get_task(name)
    splits = task.splits(real_data, seed=3, n_train=60, n_collect=30, n_test=30)
    texts = [{e.query.lower() for e in s} for s in (splits.train, splits.collect, splits.test)]
    assert [len(t) for t in texts] == [60, 30, 30]
    assert not (texts[0] & texts[1]) and not (texts[0] & texts[2]) and not (texts[1] & texts[2])
    again = task.splits(real_data, seed=3, n_train=60, n_collect=30, n_test=30)
    assert again == splits
    other = task.splits(real_data, seed=4, n_train=60, n_collect=30, n_test=30)
    assert [e.id for e in other.train] != [e.id for e in splits.train]
    for example in splits.train:
        gold = task.gold_text(example)
        assert task.is_correct(example, gold)
        assert example.query.strip()


@pytest.mark.parametrize("name", ["sst2", "ag_news", "gsm8k"])
def test_dev_split_is_disjoint_and_leaves_the_other_splits_as_they_were(name: str, real_data: Path) -> None:
    task = get_task(name)
    without = task.splits(real_data, seed=5, n_train=60, n_collect=30, n_test=30)
    with_dev = task.splits(real_data, seed=5, n_train=60, n_collect=30, n_test=30, n_dev=40)
    assert (with_dev.train, with_dev.collect, with_dev.test) == (without.train, without.collect, without.test)
    assert without.dev == [] and len(with_dev.dev) == 40 and with_dev.get("dev") == with_dev.dev
    seen = [{e.query.lower() for e in s} for s in (with_dev.train, with_dev.collect, with_dev.test)]
    assert not any({e.query.lower() for e in with_dev.dev} & texts for texts in seen)
    # collect takes what is left when no size is given: it gives the dev queries up
    rest = task.splits(real_data, seed=5, n_train=60, n_test=30, n_dev=40)
    assert not ({e.id for e in rest.collect} & {e.id for e in rest.dev}) and len(rest.dev) == 40


def test_a_dev_split_larger_than_the_data_names_the_fix() -> None:
    task = get_task("sst2_sample")
    with pytest.raises(TaskError, match="dev split"):
        task.splits(seed=0, n_train=50, n_collect=50, n_test=100, n_dev=10_000)


def test_quickstart_sample_ships_in_the_package() -> None:
    task = get_task("sst2_sample")
    splits = task.splits(seed=0, n_train=50, n_collect=50, n_test=100)
    assert len(splits.test) == 100 and {e.label for e in splits.test} == {0, 1}


def test_parse_labels_and_numbers() -> None:
    sst2 = get_task("sst2")
    assert sst2.parse("Positive. Not negative at all") == "positive"
    assert sst2.parse("it is NEGATIVE") == "negative"
    assert sst2.parse("positively great") is None  # whole words only
    gsm = get_task("gsm8k")
    assert gsm.parse("3 apples and 4 pears make 1,234.5 total") == "1234.5"
    assert gsm.parse("no number") is None


def test_demonstrations_are_fixed_per_query(real_data: Path) -> None:
    task = get_task("sst2")
    splits = task.splits(real_data, seed=0, n_train=30, n_collect=5, n_test=5)
    query = splits.test[0]
    demos = task.demos_for(query, splits.train, 4, seed=0)
    assert demos == task.demos_for(query, splits.train, 4, seed=0)
    assert len(demos) == 4 and all(d.answer in ("negative", "positive") for d in demos)
    assert task.demos_for(query, splits.train, 0) == ()


def test_missing_data_dir_names_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("QPO_DATA", raising=False)
    with pytest.raises(TaskError, match="QPO_DATA"):
        resolve_data_dir(None)
    with pytest.raises(TaskError, match="Unknown task"):
        get_task("imdb")


def test_user_task_from_jsonl(tmp_path: Path) -> None:
    data = tmp_path / "reviews.jsonl"
    rows = [{"title": f"t{i}", "body": f"body {i}", "label": "good" if i % 2 else "bad"} for i in range(20)]
    rows += [{"title": "held", "body": f"out {i}", "label": 1, "split": "test"} for i in range(5)]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    spec = tmp_path / "task.json"
    spec.write_text(json.dumps({"name": "reviews", "file": "reviews.jsonl", "query_fields": ["title", "body"],
                                "labels": ["bad", "good"]}))
    task = get_task(str(spec))
    splits = task.splits(seed=0, n_train=10, n_collect=10)
    assert len(splits.test) == 5 and all(e.label == 1 for e in splits.test)
    assert splits.train[0].query.count("\n") == 1


@pytest.mark.parametrize(
    ("content", "suffix", "message"),
    [
        ('{"text": "a", "label": "bad"}\n{oops\n', ".jsonl", r"reviews.jsonl:2: invalid JSON"),
        ('{"text": "a", "label": "meh"}\n', ".jsonl", r"reviews.jsonl:1: label 'meh'"),
        ('{"txt": "a", "label": "bad"}\n', ".jsonl", r"missing query field 'text'"),
        ("text,label\na,bad\n,good\n", ".csv", r"reviews.csv:3: the query is empty"),
        ("x", ".parquet", "unsupported file type"),
    ],
)
def test_bad_user_files_name_line_and_problem(tmp_path: Path, content: str, suffix: str, message: str) -> None:
    data = tmp_path / f"reviews{suffix}"
    data.write_text(content)
    task = TaskSpec(name="reviews", file=str(data), query_fields=("text",), labels=("bad", "good")).to_task()
    with pytest.raises(TaskError, match=message):
        task.splits(seed=0)


@pytest.mark.parametrize("name", ["sst2", "ag_news"])
def test_a_larger_test_split_extends_the_smaller_and_leaves_train_and_collect(name: str, real_data: Path) -> None:
    # benchmarks/pool_choice.py extends a finished run's test split on this property (a task with its own test file)
    task = get_task(name)
    small = task.splits(real_data, seed=2, n_train=60, n_collect=30, n_test=30)
    large = task.splits(real_data, seed=2, n_train=60, n_collect=30, n_test=70)
    assert large.test[:30] == small.test and len(large.test) == 70
    assert (large.train, large.collect) == (small.train, small.collect)
