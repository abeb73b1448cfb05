"""Crash-resume: SIGKILL the real `qpo collect` / `qpo train` processes mid-work, re-run, compare.

Every process is the real CLI run through ``_cli_probe.py``, which only adds a call
counter on the local target (one line per forward batch, written before the batch
runs, so it survives the kill). A kill is triggered by progress, not by wall time:
after a seeded random number of target calls or committed scores (collect), or a
seeded share of a phase's length in the uninterrupted run after the file that marks
the phase's start (train; a later marker cuts the wait short so the kill still lands
inside the phase). So it lands mid-work on a busy machine too.

What is checked after the re-run, against an uninterrupted run of the same command:

* the dataset holds the same records (by key; floats within 1e-9), no duplicate key
  and no torn or corrupt line;
* no target call is paid twice for a committed score: the final attempt calls the
  target exactly for the pairs that were not in ``scores.sqlite`` yet, and a killed
  attempt loses at most the chunk it was scoring (``chunk_size`` pairs);
* train: every loop has its ``metrics.json`` and a complete, loadable checkpoint, and
  no half-written checkpoint directory is left behind.

The subprocesses run torch on one thread (``OMP_NUM_THREADS=1``): it is much faster on
a busy 2-core machine, and it makes training bit-reproducible across processes, which
the dataset comparison of the train test relies on (loop 2 samples from loop 1's weights).
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from qpo_middleware.training.config import CollectConfig
from qpo_middleware.training.dataset import OfflineDataset
from qpo_middleware.training.io import decode_line
from qpo_middleware.training.loops import completed_loops
from qpo_middleware.training.run import RunPaths

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals (SIGKILL)")

TESTS = Path(__file__).resolve().parent
PROBE = TESTS / "_cli_probe.py"
CHUNK = CollectConfig().chunk_size  # the CLI scores in chunks of the default size
TIMEOUT = 180  # seconds any one CLI process may take before the test gives up

# collect: 40 queries x (4 pool prompts + no instruction) = 200 pairs = 4 chunks of <= 64 = 13 batches of 16
COLLECT_ARGS = ["collect", "--task", "sst2_sample", "--queries", "40", "--prompts", "4", "--collect-queries", "2",
                "--test-queries", "2"]
COLLECT_PAIRS = 40 * 5
# train: D0 of 12 queries x 5 prompts; loop 2 samples 2 prompts for each of 6 collect queries
D0_ARGS = ["collect", "--task", "sst2_sample", "--queries", "12", "--prompts", "4", "--collect-queries", "6",
           "--test-queries", "2"]
TRAIN_EPOCHS = 2
TRAIN_ARGS = ["train", "--loops", "2", "--epochs", str(TRAIN_EPOCHS), "--later-epochs", "1", "--num-buckets", "4",
              "--prompt-max-tokens", "6", "--query-max-tokens", "16", "--trainable", "all", "--device", "cpu",
              "--samples-per-query", "2", "--reward-floor-quantile", "0.0", "--top-k", "50",
              # the paper's recipe: its loops sample, score and append (the phases killed below)
              "--conditioning", "absolute", "--preference", "off", "--d0-floor-quantile", "0.5"]

FLOAT_FIELDS = ("reward", "prompt_mean_accuracy", "gold_nll", "label_nll")


# -- running and killing the CLI -----------------------------------------------------------------


def _env(call_log: Path, call_delay: float) -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", COLUMNS="200", QPO_CALL_LOG=str(call_log),
               QPO_CALL_DELAY=str(call_delay))
    return env


class Attempt:
    """One CLI process; ``calls()`` counts the target calls it has issued so far."""

    def __init__(self, args: list[str], workdir: Path, name: str, call_delay: float = 0.0) -> None:
        self.call_log = workdir / f"{name}.calls"
        self.out, self.err = workdir / f"{name}.out", workdir / f"{name}.err"
        with open(self.out, "wb") as out, open(self.err, "wb") as err:
            self.proc = subprocess.Popen([sys.executable, str(PROBE), *args], stdout=out, stderr=err,
                                         env=_env(self.call_log, call_delay), cwd=workdir)
        self.started = time.monotonic()
        self.killed = False

    def calls(self) -> int:
        if not self.call_log.exists():
            return 0
        lines = self.call_log.read_text().split("\n")
        return sum(int(n) for n in lines[:-1] if n)  # the last piece is "" or a line still being written

    def output(self) -> str:
        return self.out.read_text(errors="replace") + self.err.read_text(errors="replace")

    def finish(self) -> str:
        try:
            self.proc.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            pytest.fail(f"CLI did not finish in {TIMEOUT} s:\n{self.output()[-3000:]}")
        assert self.proc.returncode == 0, self.output()[-3000:]
        return self.output()

    def kill_when(self, trigger: Callable[[], bool], delay: float, guard: Callable[[], bool] | None = None) -> bool:
        """SIGKILL the process ``delay`` seconds after ``trigger()`` first holds, or as soon as ``guard()``
        holds if that comes first; False if the process ended before."""
        while not trigger():
            if self.proc.poll() is not None:
                assert self.proc.returncode == 0, self.output()[-3000:]
                return False
            if time.monotonic() - self.started > TIMEOUT:
                self.proc.kill()
                pytest.fail(f"kill trigger never fired:\n{self.output()[-3000:]}")
            time.sleep(0.005)
        deadline = time.monotonic() + delay
        while time.monotonic() < deadline and not (guard and guard()):
            time.sleep(0.005)
        if self.proc.poll() is not None:
            assert self.proc.returncode == 0, self.output()[-3000:]
            return False
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        assert self.proc.returncode == -signal.SIGKILL
        self.killed = True
        return True


# -- reading a run directory --------------------------------------------------------------------


def cached_keys(run: Path) -> set[str]:
    """Keys of the scores committed to ``scores.sqlite`` (what a resumed run gets for free)."""
    if not RunPaths(run).scores.exists():
        return set()
    db = sqlite3.connect(RunPaths(run).scores)
    try:
        return {row[0] for row in db.execute("SELECT key FROM scores")}
    finally:
        db.close()


def count_scores(run: Path) -> int:
    """Scores committed so far, read while the collect process may be writing (WAL: readers never block it)."""
    if not RunPaths(run).scores.exists():
        return 0
    try:
        db = sqlite3.connect(RunPaths(run).scores, timeout=1)
        try:
            return db.execute("SELECT count(*) FROM scores").fetchone()[0]
        finally:
            db.close()
    except sqlite3.OperationalError:  # the table is not created yet
        return 0


def dataset_lines(run: Path) -> list[dict[str, Any]]:
    """Every line of dataset.jsonl, each checked against its CRC (no torn or corrupt line)."""
    path = RunPaths(run).dataset
    if not path.exists():
        return []
    raw = path.read_text(encoding="utf-8")
    assert raw == "" or raw.endswith("\n"), "torn last line"
    records = [decode_line(line) for line in raw.splitlines()]
    assert all(r is not None for r in records), "a corrupt dataset line"
    return records  # type: ignore[return-value]


def record_key(record: dict[str, Any]) -> tuple[str, str, int]:
    return (record["query_id"], record["prompt"], record["loop"])


def assert_same_dataset(run: Path, reference: Path) -> int:
    """Same records as the reference run (order-insensitive, by key), no duplicates; returns the count."""
    lines = dataset_lines(run)
    keys = [record_key(r) for r in lines]
    assert len(keys) == len(set(keys)), f"{len(keys) - len(set(keys))} duplicate record(s)"
    OfflineDataset(run)  # the library reads it back without recovering anything
    got = {record_key(r): r for r in lines}
    want = {record_key(r): r for r in dataset_lines(reference)}
    assert got.keys() == want.keys(), (f"lost: {sorted(want.keys() - got.keys())[:5]}, "
                                       f"extra: {sorted(got.keys() - want.keys())[:5]}")
    for key, record in got.items():
        expected = want[key]
        assert record.keys() == expected.keys()
        for name, value in record.items():
            if name in FLOAT_FIELDS and value is not None and expected[name] is not None:
                assert math.isclose(value, expected[name], rel_tol=0, abs_tol=1e-9), (key, name, value, expected[name])
            else:
                assert value == expected[name], (key, name, value, expected[name])
    return len(lines)


# -- collect ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_target(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny random Llama with the SmolLM2 tokenizer: the local target and the policy base."""
    from _tiny_policy import save_tiny_checkpoint

    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def collect_reference(tmp_path_factory: pytest.TempPathFactory, tiny_target: str) -> tuple[Path, int]:
    """An uninterrupted `qpo collect`; returns its run directory and its target calls."""
    work = tmp_path_factory.mktemp("collect-ref")
    attempt = Attempt([*COLLECT_ARGS, "--target", tiny_target, "--out", "run"], work, "ref")
    output = attempt.finish()
    assert f"target calls: {COLLECT_PAIRS}" in output
    return work / "run", attempt.calls()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_killed_collect_resumes_to_the_uninterrupted_dataset(
    tmp_path: Path, tiny_target: str, collect_reference: tuple[Path, int], seed: int
) -> None:
    reference, reference_calls = collect_reference
    assert reference_calls == COLLECT_PAIRS
    rng = random.Random(seed)
    args = [*COLLECT_ARGS, "--target", tiny_target, "--out", "run"]
    run = tmp_path / "run"
    total_calls, kills, lost_per_kill, triggers = 0, 0, [], []
    for number in range(rng.randint(1, 2)):  # one or two kills, then a clean re-run
        before = cached_keys(run)
        remaining = COLLECT_PAIRS - len(before)
        if remaining <= 16:
            break
        # Kill once the attempt has issued k target calls, or once k more scores are committed
        # (plus up to 0.1 s): mid-chunk, while a chunk is being committed, or between chunks.
        k = rng.randint(1, remaining - 16)
        attempt = Attempt(args, tmp_path, f"kill{number}", call_delay=0.03)
        if rng.random() < 0.5:
            trigger = f"{k} calls"
            fired = attempt.kill_when(lambda a=attempt, k=k: a.calls() >= k, rng.uniform(0.0, 0.1))
        else:
            trigger = f"{k} scores"
            goal = len(before) + k
            fired = attempt.kill_when(lambda goal=goal: count_scores(run) >= goal, rng.uniform(0.0, 0.1))
        if not fired:
            break  # finished before the kill landed: nothing left to resume
        triggers.append(trigger)
        kills += 1
        after = cached_keys(run)
        assert before <= after  # committed scores are never lost
        lost = attempt.calls() - len(after - before)  # paid for but not committed when killed
        assert 0 <= lost <= CHUNK, lost
        lost_per_kill.append(lost)
        total_calls += attempt.calls()
        assert not RunPaths(run).collect_summary.exists() or len(after) == COLLECT_PAIRS
    assert kills >= 1, "no kill landed mid-work"

    before = cached_keys(run)
    final = Attempt(args, tmp_path, "final")
    final.finish()
    total_calls += final.calls()
    summary = json.loads(RunPaths(run).collect_summary.read_text())
    # Every committed score came from the cache; only the missing pairs were paid for.
    assert summary["cached_pairs"] == len(before)
    assert summary["target_calls"] == final.calls() == COLLECT_PAIRS - len(before)
    assert summary["failed_pairs"] == 0
    if before:
        assert summary["cached_pairs"] > 0
    assert cached_keys(run) == cached_keys(reference)
    assert total_calls <= reference_calls + CHUNK * kills
    assert total_calls == reference_calls + sum(lost_per_kill)
    assert assert_same_dataset(run, reference) == COLLECT_PAIRS
    assert summary["dataset_records"] == COLLECT_PAIRS
    print(f"seed {seed}: {kills} kill(s) after {triggers}, committed before the final run {len(before)}/{COLLECT_PAIRS}, "
          f"calls lost per kill {lost_per_kill}, total calls {total_calls} vs {reference_calls} uninterrupted")


# -- train --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def d0_run(tmp_path_factory: pytest.TempPathFactory, tiny_target: str) -> Path:
    """A collected run directory (D0) that every train run starts from (as a copy)."""
    work = tmp_path_factory.mktemp("d0")
    Attempt([*D0_ARGS, "--target", tiny_target, "--out", "run"], work, "collect").finish()
    return work / "run"


def train_args(run: Path, base: str) -> list[str]:
    return [*TRAIN_ARGS, "--run", str(run), "--base-model", base]


def _d0_count(run: Path) -> int:
    return sum(1 for r in dataset_lines(run) if r["loop"] == 0)


_D0_LINES: dict[Path, int] = {}  # run directory -> its D0 record count (the dataset's lines before loop 2)


def _loop2_appended(run: Path) -> bool:
    try:
        lines = RunPaths(run).dataset.read_bytes().count(b"\n")
    except OSError:
        return False
    return lines > _D0_LINES[run]


# Files that show how far a `qpo train` has got, in order.
MARKERS: dict[str, Callable[[Path], bool]] = {
    # buckets.json is written just before loop 1 fine-tunes (2 epochs, a checkpoint save after each)
    "loop1-start": lambda run: RunPaths(run).buckets.exists(),
    # loop 1's fine-tuning is over (its policy metadata is written): it scores greedy prompts
    "loop1-trained": lambda run: (RunPaths(run).checkpoint(1) / "qpo_policy.json").exists(),
    # loop 1 is done: loop 2 loads its checkpoint, samples and scores the new pairs
    "loop1-done": lambda run: RunPaths(run).metrics(1).exists(),
    # loop 2 appended its kept pairs: it fine-tunes, saves and scores greedy prompts
    "loop2-appended": _loop2_appended,
    # loop 2's checkpoint save has begun (its temporary directory exists)
    "loop2-saving": lambda run: any(RunPaths(run).loop(2).glob(".checkpoint-*")),
    # loop 2 is done (only the summary table and the exit are left)
    "loop2-done": lambda run: RunPaths(run).metrics(2).exists(),
    # a checkpoint save is in progress (its temporary directory exists)
    "saving": lambda run: any(RunPaths(run).policy.glob("loop_*/.checkpoint-*")),
}
# phase -> (marker it starts at; marker it ends at; seeded delay, as a fraction of that window in
# the reference run; a marker that cuts the delay short, so the kill lands inside the phase however
# the machine's speed varies; the marker the kill must come before). "checkpoint-save" waits 0-20 ms.
PHASES: dict[str, tuple[str, str | None, tuple[float, float], str | None, str | None]] = {
    "loop1-train": ("loop1-start", "loop1-done", (0.05, 0.9), "loop1-trained", "loop1-done"),
    "loop2-sample": ("loop1-done", "loop2-appended", (0.0, 0.9), "loop2-appended", "loop2-done"),
    "loop2-train": ("loop2-appended", "loop2-done", (0.0, 0.9), "loop2-saving", "loop2-done"),
    "checkpoint-save": ("saving", None, (0.0, 0.02), None, None),
}


@pytest.fixture(scope="module")
def train_reference(tmp_path_factory: pytest.TempPathFactory, tiny_target: str,
                    d0_run: Path) -> tuple[Path, int, dict[str, float]]:
    """An uninterrupted `qpo train`: its run directory, target calls, and when each marker appeared."""
    work = tmp_path_factory.mktemp("train-ref")
    run = work / "run"
    shutil.copytree(d0_run, run)
    _D0_LINES[run] = _d0_count(run)
    attempt = Attempt(train_args(run, tiny_target), work, "ref", call_delay=0.05)
    seen: dict[str, float] = {}
    while attempt.proc.poll() is None and time.monotonic() - attempt.started < TIMEOUT:
        for name, marker in MARKERS.items():
            if name not in seen and marker(run):
                seen[name] = time.monotonic() - attempt.started
        time.sleep(0.005)
    attempt.finish()
    metrics = completed_loops(run)
    assert [m.loop for m in metrics] == [1, 2]
    assert metrics[1].kept_pairs > 0  # loop 2 appends records, so a kill can land after the append
    assert {"loop1-start", "loop1-trained", "loop1-done", "loop2-appended", "loop2-done"} <= seen.keys()
    return run, attempt.calls(), seen


def state_of(run: Path) -> str:
    done = [m.loop for m in completed_loops(run)]
    appended = _loop2_appended(run)
    partial = sorted(p.name for p in RunPaths(run).policy.glob("loop_*/.checkpoint-*"))
    return (f"loops done {done}, loop-2 records {'in' if appended else 'not in'} the dataset"
            + (f", half-written checkpoint(s) {len(partial)}" if partial else ""))


def assert_checkpoints_complete(run: Path) -> None:
    from transformers import AutoModelForCausalLM

    from qpo_middleware.training.export import read_policy_meta
    from qpo_middleware.training.trainer import TRAINER_STATE_FILE

    paths = RunPaths(run)
    for loop, epochs in ((1, TRAIN_EPOCHS), (2, 1)):
        checkpoint, metrics = paths.checkpoint(loop), paths.metrics(loop)
        assert metrics.is_file()
        leftovers = sorted(p.name for p in paths.loop(loop).iterdir() if p not in (checkpoint, metrics))
        assert not leftovers, f"loop {loop}: half-written checkpoint files left: {leftovers}"
        state = json.loads((checkpoint / TRAINER_STATE_FILE).read_text())
        assert state["epoch"] == epochs and state["loop"] == loop
        read_policy_meta(checkpoint)
        AutoModelForCausalLM.from_pretrained(checkpoint)


@pytest.mark.parametrize(("seed", "phases"), [(0, ("loop1-train", "loop2-train")),
                                              (1, ("checkpoint-save", "loop2-sample")), (2, ("loop2-train",))])
def test_killed_train_resumes_to_the_uninterrupted_run(
    tmp_path: Path, tiny_target: str, d0_run: Path, train_reference: tuple[Path, int, dict[str, float]],
    seed: int, phases: tuple[str, ...],
) -> None:
    reference, reference_calls, timeline = train_reference
    run = tmp_path / "run"
    shutil.copytree(d0_run, run)
    _D0_LINES[run] = _d0_count(run)
    rng = random.Random(seed)
    args = train_args(run, tiny_target)
    total_calls, lost_per_kill, states = 0, [], []
    for number, phase in enumerate(phases):
        start, until, (low, high), cut, before_marker = PHASES[phase]
        delay = rng.uniform(low, high) * (timeline[until] - timeline[start] if until else 1.0)
        before = cached_keys(run)
        attempt = Attempt(args, tmp_path, f"kill{number}", call_delay=0.05)
        marker, guard = MARKERS[start], MARKERS[cut] if cut else None
        assert attempt.kill_when(lambda m=marker: m(run), delay, guard and (lambda g=guard: g(run))), (
            f"{phase}: ended before the kill")
        if before_marker:
            assert not MARKERS[before_marker](run), f"{phase}: the kill landed after the loop ({delay:.2f} s)"
        after = cached_keys(run)
        assert before <= after
        lost = attempt.calls() - len(after - before)
        assert 0 <= lost <= CHUNK, lost
        lost_per_kill.append(lost)
        total_calls += attempt.calls()
        states.append(state_of(run))

    before = cached_keys(run)
    final = Attempt(args, tmp_path, "final")
    final.finish()
    total_calls += final.calls()
    assert final.calls() == len(cached_keys(run) - before)  # nothing in the cache was paid for again
    assert cached_keys(run) == cached_keys(reference)
    assert total_calls == reference_calls + sum(lost_per_kill)

    metrics, expected = completed_loops(run), completed_loops(reference)
    assert [m.loop for m in metrics] == [1, 2]
    for got, want in zip(metrics, expected, strict=True):
        assert (got.train_records, got.sampled_pairs, got.kept_pairs) == (
            want.train_records, want.sampled_pairs, want.kept_pairs)
    records = assert_same_dataset(run, reference)
    assert_checkpoints_complete(run)
    same_weights = all(
        (RunPaths(run).checkpoint(loop) / "model.safetensors").read_bytes()
        == (RunPaths(reference).checkpoint(loop) / "model.safetensors").read_bytes() for loop in (1, 2))
    print(f"seed {seed}: killed at {list(zip(phases, states, strict=True))}; calls lost per kill {lost_per_kill}; "
          f"total calls {total_calls} vs {reference_calls} uninterrupted; {records} records; "
          f"weights identical to the uninterrupted run: {same_weights}")
