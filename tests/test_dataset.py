from __future__ import annotations

from pathlib import Path

import pytest

from qpo_middleware.training.dataset import DatasetError, OfflineDataset, Record
from qpo_middleware.training.io import CorruptFileError, JsonlLog, atomic_write_json


def record(i: int, loop: int = 0, prompt: str = "p") -> Record:
    return Record(task="t", query_id=f"q{i}", query=f"query {i}", prompt=prompt, prompt_source="pool:x", loop=loop,
                  target="hf:x", correct=bool(i % 2), reward=float(i), prompt_mean_accuracy=0.5, gold_nll=0.1)


def test_append_dedupes_by_key_and_survives_reopen(tmp_path: Path) -> None:
    ds = OfflineDataset(tmp_path)
    assert ds.append([record(0), record(1)]) == 2
    assert ds.append([record(1), record(2), record(1, loop=1)]) == 2  # (q1, p, 0) already there
    again = OfflineDataset(tmp_path)
    assert [r.key() for r in again] == [("q0", "p", 0), ("q1", "p", 0), ("q2", "p", 0), ("q1", "p", 1)]
    assert again.records[0] == record(0)
    assert again.max_loop() == 1 and len(again.loop(1)) == 1


def test_torn_last_line_is_dropped_and_appends_continue(tmp_path: Path) -> None:
    ds = OfflineDataset(tmp_path)
    ds.append([record(i) for i in range(3)])
    data = ds.path.read_bytes()
    ds.path.write_bytes(data + data.splitlines(keepends=True)[0][:25])  # a crash mid-append
    recovered = OfflineDataset(tmp_path)
    assert len(recovered) == 3
    assert recovered.path.read_bytes() == data  # truncated back to the last good record
    recovered.append([record(3)])
    assert len(OfflineDataset(tmp_path)) == 4


def test_checksum_mismatch_in_last_complete_line_is_dropped(tmp_path: Path) -> None:
    log = JsonlLog(tmp_path / "x.jsonl")
    log.append_many([{"a": 1}, {"a": 2}])
    text = log.path.read_text().replace('"a": 2', '"a": 3')
    log.path.write_text(text)
    assert JsonlLog(log.path).records == [{"a": 1}]


def test_damage_in_the_middle_raises_with_the_line(tmp_path: Path) -> None:
    log = JsonlLog(tmp_path / "x.jsonl")
    log.append_many([{"a": 1}, {"a": 2}, {"a": 3}])
    lines = log.path.read_text().splitlines(keepends=True)
    lines[1] = lines[1].replace('"a": 2', '"a": 9')
    log.path.write_text("".join(lines))
    with pytest.raises(CorruptFileError, match="line 2"):
        JsonlLog(log.path)


def test_bad_records_are_refused(tmp_path: Path) -> None:
    ds = OfflineDataset(tmp_path)
    bad = record(0)
    bad.reward = float("nan")
    with pytest.raises(DatasetError, match="reward"):
        ds.append([bad])
    with pytest.raises(DatasetError, match="lacks"):
        Record.from_dict({"task": "t"})
    assert len(OfflineDataset(tmp_path)) == 0


def test_atomic_write_leaves_no_temp_files(tmp_path: Path) -> None:
    atomic_write_json(tmp_path / "a.json", {"x": 1})
    atomic_write_json(tmp_path / "a.json", {"x": 2})
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]
    assert '"x": 2' in (tmp_path / "a.json").read_text()


def test_atomic_writes_get_the_mode_open_would_give(tmp_path: Path) -> None:
    """Not the temp file's 0o600: results.json and caches are read by other users and tools."""
    import os

    old = os.umask(0o027)
    try:
        from qpo_middleware.training import io

        io._new_file_mode.cache_clear()
        atomic_write_json(tmp_path / "a.json", {"x": 1})
        assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o640
    finally:
        os.umask(old)
        io._new_file_mode.cache_clear()
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_run_layout_names_are_stable(tmp_path) -> None:
    """Runs made by earlier versions must still open: the names RunPaths gives are the on-disk format."""
    from qpo_middleware.training.run import RunPaths

    paths = RunPaths(str(tmp_path))
    names = {
        "run.json": paths.run_file, "scores.sqlite": paths.scores, "dataset.jsonl": paths.dataset,
        "collect.json": paths.collect_summary, "prompts.json": paths.induced_prompts,
        "policy/buckets.json": paths.buckets,
        "policy/loop_2": paths.loop(2), "policy/loop_2/metrics.json": paths.metrics(2),
        "policy/loop_2/checkpoint": paths.checkpoint(2), "bundle": paths.bundle, "results.json": paths.eval_results,
        "quickstart.json": paths.quickstart_report, "bench/bundles/loop_3": paths.bench_bundle(3),
    }
    assert {name: path.relative_to(tmp_path).as_posix() for name, path in names.items()} == {n: n for n in names}
    assert not paths.is_run()
    paths.run_file.write_text("{}")
    assert paths.is_run()
