"""Keep a benchmark run's target verdicts past the machine it ran on.

A run's ``scores.sqlite`` holds every verdict the target was paid for, and lives under an ignored ``runs/`` folder.
``save`` writes it to a gzipped JSON-lines file (:meth:`~qpo_middleware.training.targets.ScoreCache.dump`, sorted,
the same bytes for the same verdicts) that can be committed beside the run's report; ``load`` adds such a file to
a run directory's cache, and ``pool_choice.py --verdicts-from FILE`` seeds a new run with it, so a run cut short on
one machine resumes on another and pays only for the pairs it had not scored.

    python benchmarks/verdicts.py save benchmarks/results/X/runs/TASK-seedN/d0 benchmarks/results/X/TASK-seedN/verdicts.jsonl.gz
    python benchmarks/verdicts.py load benchmarks/results/X/TASK-seedN/verdicts.jsonl.gz benchmarks/results/X/runs/TASK-seedN/d0
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from qpo_middleware.training.run import RunPaths
from qpo_middleware.training.targets import ScoreCache


def seed_cache(source: Path, scores: Path) -> int:
    """A new score cache at ``scores`` from ``source``: another run directory (its ``scores.sqlite`` is copied) or
    a :meth:`ScoreCache.dump` file. Built beside ``scores`` and moved into place, so a copy cut short never poses as
    the cache. Returns the number of verdicts it holds; exits with a message that names the fix on a bad source."""
    partial = scores.with_name(scores.name + ".partial")
    partial.unlink(missing_ok=True)
    if source.is_file():
        cache = ScoreCache(partial)
        try:
            cache.load(source)
        except ValueError as exc:
            cache.close()
            partial.unlink(missing_ok=True)
            sys.exit(f"--verdicts-from {exc}")
        count = cache.count()
        cache.close()  # the last connection's close folds the write-ahead log into the file that is moved
    else:
        source_scores = RunPaths(source).scores
        if not source_scores.is_file():
            sys.exit(f"--verdicts-from {source}: no {source_scores.name} there; pass a run directory or a "
                     "verdicts.jsonl.gz saved by benchmarks/verdicts.py.")
        source_cache = ScoreCache(source_scores)
        count = source_cache.copy(partial)
        source_cache.close()
    partial.replace(scores)
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    save = commands.add_parser("save", help="A run directory's verdicts to a .jsonl.gz file.")
    save.add_argument("run_dir", type=Path)
    save.add_argument("out", type=Path)
    load = commands.add_parser("load", help="A .jsonl.gz file's verdicts into a run directory's cache.")
    load.add_argument("dump", type=Path)
    load.add_argument("run_dir", type=Path)
    args = parser.parse_args()
    if args.command == "save":
        scores = RunPaths(args.run_dir).scores
        if not scores.is_file():
            sys.exit(f"{args.run_dir}: no {scores.name} there; pass the run directory that holds it (a pool_choice "
                     "run's is runs/TASK-seedN/d0).")
        print(f"{ScoreCache(scores).dump(args.out)} verdicts -> {args.out}")
    else:
        try:
            added = ScoreCache(RunPaths(args.run_dir).scores).load(args.dump)
        except ValueError as exc:
            sys.exit(str(exc))
        print(f"{added} new verdicts -> {RunPaths(args.run_dir).scores}")


if __name__ == "__main__":
    main()
