"""Merge the per-task results of a GPU quality run (stage2.sh runs one process per task) into one
``results.json``, ``report.md`` and plots, as ``benchmarks/quality.py`` writes for several tasks.

Usage::

    tar -xzf quality-gpu.tgz -C /tmp/gpu
    python benchmarks/device/merge.py /tmp/gpu/q-sst2 /tmp/gpu/q-ag_news --out benchmarks/results/quality-gpu \\
        --note "how it ran"
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the harness, benchmarks/qpo_bench

REBUILT = {"tasks", "wall_seconds", "notes"}  # set below from every run


def merge(folders: list[Path], notes: list[str]) -> dict[str, Any]:
    payloads = [json.loads((folder / "results.json").read_text(encoding="utf-8")) for folder in folders]
    first = payloads[0]
    for other in payloads[1:]:
        for key in ("config", "environment"):
            a = {k: v for k, v in first[key].items() if k != "tasks"}
            b = {k: v for k, v in other[key].items() if k != "tasks"}
            if a != b:
                raise SystemExit(f"{key} differs between the runs: merge only runs of one profile, seed and machine.")
    merged = {k: v for k, v in first.items() if k not in REBUILT}
    merged["config"] = {**first["config"], "tasks": [t for p in payloads for t in p["config"]["tasks"]]}
    merged["tasks"] = {name: task for p in payloads for name, task in p["tasks"].items()}
    # The tasks ran side by side: the run took as long as the slowest.
    merged["wall_seconds"] = max(p["wall_seconds"] for p in payloads)
    merged["notes"] = [*first.get("notes", []), *notes]
    return merged


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", type=Path, help="Output folders of quality.py, one task each.")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--note", action="append", default=[])
    args = parser.parse_args(argv)
    from qpo_bench import write_plots, write_report
    from qpo_middleware.training.io import atomic_write_json

    payload = merge(args.folders, args.note)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, task in payload["tasks"].items():
        task["plots"] = [str(p.relative_to(args.out)) for p in write_plots(task, args.out, name=name)]
    atomic_write_json(args.out / "results.json", payload)
    write_report(payload, args.out)
    print(f"{args.out / 'report.md'}: {', '.join(payload['tasks'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
