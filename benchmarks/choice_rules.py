"""Choice rules tried on a finished ``pool_choice.py`` run, from its ``per_query.json``: no model, no target.

``dpo_ratio`` (policy over its DPO reference) needs the reference model beside the policy at serving time:
twice the bundle and twice the scoring. Two rules that do not:

* ``ratio_prior`` — the policy's log-probability minus the reference's *mean* log-probability of each pool
  prompt over the dev queries: one number per prompt, stored with the bundle (labels are not read);
* ``policy_pmi`` — the policy's log-probability minus its own mean over the dev queries (no reference at all).

The rule is chosen on dev among the reference-free ones; test is scored once, with the chosen rule, on the
test queries whose full pool grid was scored (``--bound-queries``), beside ``dpo_ratio`` and the fixed
prompts on the same queries. Writes ``choice_rules.json`` and ``choice_rules.md`` next to ``per_query.json``.

    python benchmarks/choice_rules.py benchmarks/results/pool-choice-cpu/sst2-seed1-n1000x5-t600
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

from qpo_bench.environment import code_version
from qpo_bench.offline import method_line, method_row
from qpo_middleware.training.io import atomic_write_json

FREE_RULES = ("likelihood", "ratio_prior", "policy_pmi")  # need only the policy (and per-prompt offsets)


def column_means(rows: list[list[float]]) -> list[float]:
    return [statistics.fmean(column) for column in zip(*rows, strict=True)]


def rule_scores(rule: str, logps: dict[str, list[list[float]]], offsets: dict[str, list[float]]) -> list[list[float]]:
    """Per query, each pool prompt's score under a reference-free ``rule`` (the prompt sent is the argmax)."""
    top = logps["top"]
    if rule == "likelihood":
        return top
    offset = offsets["reference" if rule == "ratio_prior" else "top"]
    return [[t - o for t, o in zip(tq, offset, strict=True)] for tq in top]


def picks(scores: list[list[float]]) -> list[int]:
    return [max(range(len(row)), key=row.__getitem__) for row in scores]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="A pool_choice results folder holding per_query.json and results.json.")
    parser.add_argument("--recipe", default=None, help="The recipe whose policy chooses (default: the one dev chose).")
    args = parser.parse_args()
    source = args.run / "per_query.json"
    if not source.is_file():
        sys.exit(f"{source} is missing: run benchmarks/pool_choice.py (it writes per_query.json) for this folder first.")
    data = json.loads(source.read_text(encoding="utf-8"))
    results = json.loads((args.run / "results.json").read_text(encoding="utf-8"))
    recipe = args.recipe or results["validation"]["chosen_recipe"]
    dev, test = data["splits"]["dev"], data["splits"]["test"]
    if recipe not in dev["policy_logps"] or recipe not in test["policy_logps"]:
        sys.exit(f"Recipe {recipe!r} has no policy log-probabilities on dev and test in {source}.")
    dev_logps, test_logps = dev["policy_logps"][recipe], test["policy_logps"][recipe]
    if "reference" not in dev_logps:
        sys.exit(f"Recipe {recipe!r} has no reference log-probabilities: ratio_prior needs a preference-trained policy.")
    offsets = {"reference": column_means(dev_logps["reference"]), "top": column_means(dev_logps["top"])}

    def verdicts(split: dict[str, Any], chosen: list[int]) -> list[bool]:
        grid = [split["grid"][qid] for qid in split["ids"][: len(split["grid"])]]
        return [row[c] == "1" for row, c in zip(grid, chosen[: len(grid)], strict=True)]

    # dpo_ratio as the run scored it (its verdicts are recorded), beside the rules tried here.
    ratio = f"qpo_{recipe}_dpo_ratio"
    dev_scores = {r: statistics.fmean(verdicts(dev, picks(rule_scores(r, dev_logps, offsets)))) for r in FREE_RULES}
    chosen = max(FREE_RULES, key=dev_scores.__getitem__)
    if ratio in dev["hits"]:
        dev_scores["dpo_ratio"] = statistics.fmean(c == "1" for c in dev["hits"][ratio])

    bound = len(test["grid"])
    head = {k: [c == "1" for c in v[:bound]] for k, v in test["hits"].items()}
    rows = {
        f"{chosen} (chosen on dev, no reference model)": verdicts(test, picks(rule_scores(chosen, test_logps, offsets))),
        **({"dpo_ratio": head[ratio]} if ratio in head else {}),
        **{k: head[k] for k in ("best_prompt", "best_prompt_dev", "selector") if k in head},
    }
    # A bound, not a method: the one pool prompt that is best on these test queries (it reads their labels).
    # A rule above it routes per query; a gain up to it is one prompt that suits test, found by choosing.
    grid = [test["grid"][qid] for qid in test["ids"][:bound]]
    columns = {p: [row[i] == "1" for row in grid] for i, p in enumerate(data["prompts"])}
    hindsight = max(columns, key=lambda p: sum(columns[p]))
    rows[f"best_prompt_hindsight ({hindsight}; bound)"] = columns[hindsight]
    references = {k: rows[k] for k in ("best_prompt", "best_prompt_dev", "dpo_ratio") if k in rows}
    methods = {k: method_row(v, {r: h for r, h in references.items() if r != k}) for k, v in rows.items()}
    out = {"benchmark": "choice_rules", "run": args.run.as_posix(), "recipe": recipe,
           "command": " ".join(["python", Path(sys.argv[0]).as_posix(), *sys.argv[1:]]), **code_version(),
           "offsets_from": f"{len(dev['ids'])} dev queries (reference and policy means per prompt; labels not read)",
           "validation": {"scores": dev_scores, "chosen": chosen}, "test": {"queries": bound, "methods": methods}}
    atomic_write_json(args.run / "choice_rules.json", out)
    lines = [
        f"# Choice rules without the reference model: {results['task']}, recipe {recipe}", "",
        f"`{out['command']}` — commit `{out['commit']}`; from `{source.as_posix()}` (run commit `{results['commit']}`)", "",
        "| rule | dev accuracy |", "|---|---:|",
        *[f"| {r} | {100 * v:.1f} |" for r, v in sorted(dev_scores.items(), key=lambda kv: -kv[1])], "",
        f"Chosen among {', '.join(FREE_RULES)}: `{chosen}`. Test: the first {bound} test queries (the full pool grid).",
        "`best_prompt_hindsight` is the single pool prompt best on these test queries: a bound (it reads their labels).",
        "A rule above it routes per query; one below it gains, at most, by finding the prompt that suits test.", "",
        "| method | accuracy % [95% CI] | " + " | ".join(f"vs {r.replace('_', ' ')}" for r in references) + " |",
        "|---|---|" + "---|" * len(references),
        *[method_line(k, row, list(references)) for k, row in methods.items()], "",
    ]
    (args.run / "choice_rules.md").write_text("\n".join(lines), encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
