"""Paired comparison of methods recorded by different ``pool_choice.py`` runs on the same split seed.

Each run's ``per_query.json`` holds every method's verdict per query; two runs on one seed score the same dev and
test queries, so a recipe from one run can be compared query by query with a recipe from another (a recipe added
later, on the same D0). Each ``FOLDER=METHOD`` names a run and the method to read from it (its full name in the report, e.g.
``qpo_label_route_no_lean_q1000_likelihood``); the first is compared
with the others and with the first run's best train prompt and selector. The query ids and gold labels must agree.

    python benchmarks/compare_runs.py \\
        benchmarks/results/pool-choice-qwen-routeq/ag_news-seed1-n1000x5=qpo_label_route_no_lean_q1000_likelihood \\
        benchmarks/results/pool-choice-qwen-nolean/ag_news-seed1-n1000x5=qpo_label_route_no_lean_likelihood
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from qpo_bench.offline import method_row

REFERENCES = ("best_prompt", "selector")


def read_hits(hits: dict[str, str], method: str, folder: str) -> list[bool]:
    """One method's verdicts from a split's ``hits``."""
    if method not in hits:
        raise SystemExit(f"{folder}: no method {method!r}; it has {', '.join(sorted(hits))}.")
    return [c == "1" for c in hits[method]]


def compare(specs: list[tuple[Path, str]]) -> dict[str, Any]:
    """Per split, the first run's method against each other run's method and the first run's references."""
    runs = [json.loads((folder / "per_query.json").read_text(encoding="utf-8"))["splits"] for folder, _ in specs]
    out: dict[str, Any] = {}
    for split in runs[0]:
        first = runs[0][split]
        for (folder, _), run in zip(specs[1:], runs[1:], strict=True):
            if run[split]["ids"] != first["ids"] or run[split]["gold"] != first["gold"]:
                raise SystemExit(f"{folder}: its {split} queries differ from {specs[0][0]}'s; compare runs of one seed.")
        reference = {f"{folder.parent.name}/{method}": read_hits(run[split]["hits"], method, str(folder))
                     for (folder, method), run in zip(specs[1:], runs[1:], strict=True)}
        reference |= {name: read_hits(first["hits"], name, str(specs[0][0])) for name in REFERENCES}
        out[split] = method_row(read_hits(first["hits"], specs[0][1], str(specs[0][0])), reference)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", metavar="FOLDER=METHOD", help="the first is compared with the rest")
    args = parser.parse_args(argv)
    specs = []
    for spec in args.runs:
        folder, sep, method = spec.rpartition("=")
        if not sep or not method:
            raise SystemExit(f"{spec!r}: give FOLDER=METHOD, e.g. results/run/ag_news-seed1-n1000x5=qpo_label_route_likelihood.")
        specs.append((Path(folder), method))
    if len(specs) < 2:
        raise SystemExit("Give at least two FOLDER=METHOD: the first is compared with the others.")
    print(json.dumps(compare(specs), indent=1))


if __name__ == "__main__":
    main()
