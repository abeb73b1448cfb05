"""Mean over split seeds of finished ``pool_choice.py`` runs: the issue's protocol reports each method's
accuracy and its gap to the best train prompt and to the selector averaged over seeds.

Each seed's gap comes with a paired bootstrap interval on its own test queries; the seeds are independent
splits, so the mean gap's interval is the normal approximation ``mean ± 1.96 · sqrt(Σ se_i²) / k`` with
``se_i`` = (interval width) / 3.92 per seed. QPO's row is each seed's *chosen* method (recipe and rule chosen
on that seed's dev split), so no seed's row was picked on test queries. ``--methods`` adds rows of methods
fixed before any test query was seen (e.g. one recipe on every seed), under their own names; ``qpo_<recipe>``
stands for the recipe's row with the rule each seed's dev chose. Where the runs
checked a row for steering (``results.json`` ``test.steering``, or ``checks.json`` from ``steering_recheck.py``
for a run recorded before the check), the mean share of its queries sent a steering
prompt and its mean accuracy with those sent the fallback stand beside it; where they checked it for leaning too
(``test.leaning``, a softer line), the same for leaning prompts. Writes ``seed_mean.json`` and
``seed_mean.md`` into ``--out``.

    python benchmarks/seed_mean.py benchmarks/results/pool-choice-cpu/sst2-seed{0,1,2}-n1000x5-t600 \\
        --out benchmarks/results/pool-choice-cpu/sst2-seeds
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from qpo_bench.environment import code_version
from qpo_bench.offline import ROUTE_RULES, RULES
from qpo_middleware.training.io import atomic_write_json, atomic_write_text

REFERENCES = ("best_prompt", "selector")
ROWS = ("none", "best_prompt", "random_prompt", "selector", "qpo_chosen")


def source_row(name: str, methods: Mapping[str, Any]) -> str | None:
    """The test row ``name`` stands for: itself, or for ``qpo_<recipe>`` the recipe's one row ``qpo_<recipe>_<rule>``
    (pool_choice.py scores a test recipe once, with the rule dev chose on that seed)."""
    if name in methods:
        return name
    rows = [m for m in methods if m.startswith(f"{name}_") and m.removeprefix(f"{name}_") in RULES + ROUTE_RULES]
    return rows[0] if len(rows) == 1 else None


def seed_rows(results: dict[str, Any], extra: Sequence[str] = ()) -> dict[str, dict[str, Any]]:
    """One run's test rows, QPO's under the name ``qpo_chosen``, then the ``extra`` ones (a row, or a recipe
    ``qpo_<recipe>`` with its dev-chosen rule); each with the test row it came from (``row``) and its steering
    and leaning checks (``steering``, ``leaning``) where the run made them."""
    methods = results["test"]["methods"]
    chosen = results["validation"]["chosen"]
    if chosen not in methods:
        sys.exit(f"{chosen!r} (chosen on dev) has no test row: run pool_choice.py with --test-recipes chosen.")
    if missing := [name for name in extra if source_row(name, methods) is None]:
        sys.exit(f"Seed {results['settings']['seed']} has no test row {', '.join(missing)} (or one per rule of a "
                 f"recipe); it has {', '.join(sorted(methods))}.")
    checks = {kind: results["test"].get(kind, {}) for kind in ("steering", "leaning")}
    rows = {}
    for name in [*(n for n in ROWS if n == "qpo_chosen" or n in methods), *extra]:
        source = chosen if name == "qpo_chosen" else source_row(name, methods)
        assert source is not None
        rows[name] = {**methods[source], "row": source,
                      **{kind: check[source] for kind, check in checks.items() if source in check}}
    return rows


# Per check of the runs (results.json test.<check>): the row's share of queries sent a flagged prompt, its accuracy
# with those sent the fallback instead, and that accuracy's gap to the best train prompt.
CHECKS = {"steering": ("steered_share", "accuracy_without_steering", "vs_best_prompt_without_steering"),
          "leaning": ("leaning_share", "accuracy_without_leaning", "vs_best_prompt_without_leaning")}


def mean_gap(gaps: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean of per-seed paired gaps and its normal-approximation 95% interval."""
    diff = statistics.fmean(g["diff"] for g in gaps)
    se = math.sqrt(sum(((g["ci95"][1] - g["ci95"][0]) / 3.92) ** 2 for g in gaps)) / len(gaps)
    low, high = diff - 1.96 * se, diff + 1.96 * se
    return {"diff": diff, "ci95": [low, high], "significant": low > 0 or high < 0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path, nargs="+", help="pool_choice results folders, one per split seed.")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--methods", default="", help="Comma list of test rows fixed before testing (e.g. "
                        "qpo_label_route_plain_likelihood) to average too; each seed must have them.")
    args = parser.parse_args()
    extra = [name for name in args.methods.split(",") if name]
    loaded = []
    for folder in args.runs:
        path = folder / "results.json"
        if not path.is_file():
            sys.exit(f"{path} is missing: finish benchmarks/pool_choice.py for that seed first.")
        results = json.loads(path.read_text(encoding="utf-8"))
        # A run recorded before the checks gets them from steering_recheck.py's checks.json, when there is one.
        if "steering" not in results["test"] and (checks := folder / "checks.json").is_file():
            rechecked = json.loads(checks.read_text(encoding="utf-8"))["test"]
            results["test"].update({kind: rechecked[kind] for kind in CHECKS})
            results["rechecked"] = True
        loaded.append(results)
    tasks = {r["task"] for r in loaded}
    seeds = [r["settings"]["seed"] for r in loaded]
    if len(tasks) != 1 or len(set(seeds)) != len(seeds):
        sys.exit(f"Give one task's runs with distinct seeds; got tasks {sorted(tasks)} and seeds {seeds}.")
    per_seed = [seed_rows(r, extra) for r in loaded]
    rows: dict[str, Any] = {}
    for name in dict.fromkeys([*ROWS, *extra]):
        if not all(name in s for s in per_seed):
            continue
        row: dict[str, Any] = {"accuracy": statistics.fmean(s[name]["accuracy"] for s in per_seed),
                               "per_seed": [s[name]["accuracy"] for s in per_seed],
                               "rows": [s[name]["row"] for s in per_seed],
                               "queries": sum(s[name]["n"] for s in per_seed)}
        for ref in REFERENCES:
            if ref != name:
                row[f"vs_{ref}"] = mean_gap([s[name][f"vs_{ref}"] for s in per_seed])
        for kind, (share, accuracy, vs) in CHECKS.items():
            if all(kind in s[name] for s in per_seed):
                row[share] = statistics.fmean(s[name][kind]["steered_share"] for s in per_seed)
                row[accuracy] = statistics.fmean(s[name][kind]["accuracy_without_steering"] for s in per_seed)
                row[vs] = mean_gap([s[name][kind]["vs_reference_without_steering"] for s in per_seed])
        rows[name] = row
    out = {"benchmark": "seed_mean", "task": tasks.pop(), "seeds": seeds,
           "runs": [f.as_posix() for f in args.runs], "run_commits": [r["commit"] for r in loaded],
           "chosen": [r["validation"]["chosen"] for r in loaded],
           "rechecked": [r["settings"]["seed"] for r in loaded if r.get("rechecked")],
           "command": " ".join(["python", Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
           **code_version(), "methods": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out / "seed_mean.json", out)
    atomic_write_text(args.out / "seed_mean.md", report(out))
    print(report(out))


def report(out: dict[str, Any]) -> str:
    def gap(g: dict[str, Any] | None) -> str:
        if g is None:
            return "—"
        text = f"{100 * g['diff']:+.1f} [{100 * g['ci95'][0]:+.1f}, {100 * g['ci95'][1]:+.1f}]"
        return text if g["significant"] else text + " (n.s.)"

    lines = [f"# {out['task']}: mean over split seeds {', '.join(map(str, out['seeds']))}", "",
             f"`{out['command']}` — commit `{out['commit']}`; runs at {', '.join(f'`{c}`' for c in out['run_commits'])}",
             "", "QPO = each seed's method chosen on its dev split: "
             + ", ".join(f"seed {s} `{c}`" for s, c in zip(out["seeds"], out["chosen"], strict=True)) + ".",
             "Intervals: normal approximation over the seeds' paired bootstrap intervals."
             + (f" Steering and lean checks of seed(s) {', '.join(map(str, out['rechecked']))} from "
                "`steering_recheck.py` (`checks.json`)." if out.get("rechecked") else ""), "",
             "| method | mean accuracy % | per seed | test queries | vs best prompt [95% CI] | vs selector [95% CI] "
             "| steered | without steering %, vs best prompt | leaning | without leaning %, vs best prompt |",
             "|---|---:|---|---:|---|---|---:|---:|---:|---:|"]
    recipes = {name: row["rows"] for name, row in out["methods"].items() if len(set(row.get("rows", ()))) > 1}
    if recipes:
        lines[5:5] = ["Recipe rows, each seed's test row (the recipe with the rule its dev chose): " + "; ".join(
            f"{name}: " + ", ".join(f"`{r}`" for r in rows) for name, rows in recipes.items()) + ".", ""]
    for name, row in out["methods"].items():
        steered = " | ".join(f"{100 * row[share]:.0f}% | {100 * row[accuracy]:.1f}, {gap(row[vs])}" if share in row
                             else "– | –" for share, accuracy, vs in CHECKS.values())
        lines.append(f"| {name} | {100 * row['accuracy']:.1f} | " + " / ".join(f"{100 * a:.1f}" for a in row["per_seed"])
                     + f" | {row['queries']} | {gap(row.get('vs_best_prompt'))} | {gap(row.get('vs_selector'))} "
                     f"| {steered} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
