"""The steering and lean checks for a ``pool_choice.py`` run recorded before they existed (or whose caches are gone).

Both checks read the target's *answers* on the dev queries, which older runs did not keep. This scores every pool
prompt on the run's dev queries again (cached under ``<out>/runs/<run>-recheck/``; 150 queries x the pool, minutes
on SmolLM2), checks that the verdicts equal the run's recorded dev grid, and flags each pool prompt that steers the
target to one label (``tasks.steered_label``) or leans it there (``tasks.LEAN_REACH``). Each QPO test row's picks are
derived again from the policy scores ``per_query.json`` keeps (rules ``likelihood``, ``implicit``, ``dpo_ratio``),
and must reproduce the row's recorded verdicts on every fully scored test query. Then, per row, the share of its
test queries sent a flagged prompt and its accuracy with those queries given ``best_prompt_dev``'s verdicts
(:func:`qpo_bench.offline.steering_check`, the same as ``pool_choice.py``'s), with its paired gap to the best train
prompt and to the selector as recorded (the selector's picks were not kept, so it is not checked itself; where it
sends flagged prompts too, the gap to it flatters it). Nothing is trained or chosen; the
run's numbers are not changed. Writes ``checks.json`` and ``checks.md`` next to ``per_query.json``;
``seed_mean.py`` reads them for runs whose ``results.json`` has no checks.

    python benchmarks/steering_recheck.py benchmarks/results/pool-choice-cpu/sst2-seed1-n1000x5-t600
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any

from qpo_bench.environment import code_version, environment
from qpo_bench.offline import open_pool_choice_run, rule_picks, steering_check
from qpo_middleware.training.collect import score_pairs
from qpo_middleware.training.io import atomic_write_json, atomic_write_text
from qpo_middleware.training.targets import Pair, make_target
from qpo_middleware.training.tasks import LEAN_REACH, steered_label


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("result_dir", type=Path, help="A pool_choice.py result directory (with per_query.json).")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    code = code_version()
    results, per_query, task, splits = open_pool_choice_run(args.result_dir)
    if not task.labels:
        sys.exit(f"{results['task']} is not a classification task: steering needs labels.")
    texts = {entry["source"]: entry["text"] for entry in results["pool"]}
    sources = per_query["prompts"]  # grid columns
    dev, test = per_query["splits"]["dev"], per_query["splits"]["test"]
    dev_ex = list(splits.collect)
    if any(e.id not in dev["grid"] for e in dev_ex):
        sys.exit("Not every dev query of this run has the full grid; rerun pool_choice.py to finish it.")

    # -- the target's answers on dev, checked against the run's verdicts ----------------------------------------
    cache = args.result_dir.parent / "runs" / f"{args.result_dir.name}-recheck" / "scores.sqlite"
    cache.parent.mkdir(parents=True, exist_ok=True)
    target = make_target(results["settings"]["target"], cache_path=cache)
    started = time.perf_counter()
    pairs = [Pair(e, texts[s], s) for e in dev_ex for s in sources]
    logging.info("Scoring %d pool prompts on %d dev queries (%d pairs)", len(sources), len(dev_ex), len(pairs))
    scores = score_pairs(target, task, pairs)
    seconds = time.perf_counter() - started
    answers: dict[str, list[str | None]] = {s: [] for s in sources}
    differ = 0
    for pair, score in zip(pairs, scores, strict=True):
        answers[pair.prompt_source].append(score.prediction)
        recorded = dev["grid"][pair.example.id][sources.index(pair.prompt_source)] == "1"
        differ += bool(score.correct) != recorded
    if differ > 0.01 * len(pairs):
        sys.exit(f"{differ} of {len(pairs)} dev verdicts differ from the run's: this target or data is not the one "
                 "the run used.")
    golds = [task.gold_text(e) for e in dev_ex]
    steering = {s: steered_label(answers[s], golds) for s in sources}
    leaning = {s: steered_label(answers[s], golds, LEAN_REACH) for s in sources}

    # -- each method's test picks, rederived and checked, then the checks ------------------------------------------
    hits = {name: [bit == "1" for bit in bits] for name, bits in test["hits"].items()}
    fixed = {"best_prompt": results["d0"]["best_prompt"], "best_prompt_dev": results["best_prompt_dev"]["prompt"],
             "none": "none"}
    sent = {name: [source] * len(test["ids"]) for name, source in fixed.items() if name in hits and source in sources}
    unchecked: dict[str, str] = {}
    for name in hits:
        if not name.startswith("qpo_"):
            continue
        recipe = next((r for r in test["policy_logps"] if name.startswith(f"qpo_{r}_")), None)
        rule = name.removeprefix(f"qpo_{recipe}_") if recipe else ""
        picks = rule_picks(rule, test["policy_logps"][recipe]) if recipe else None
        if picks is None:
            unchecked[name] = f"rule {rule!r} cannot be derived from the recorded scores"
            continue
        sent[name] = [sources[j] for j in picks]
    for name, picks in sent.items():
        wrong = [qid for i, qid in enumerate(test["ids"]) if qid in test["grid"]
                 and (test["grid"][qid][sources.index(picks[i])] == "1") != hits[name][i]]
        if wrong:
            sys.exit(f"{name}'s rederived picks do not reproduce its verdicts on {len(wrong)} test queries "
                     f"(first {wrong[0]}); this per_query.json cannot be rechecked.")
    checks = {}
    for kind, flags in (("steering", steering), ("leaning", leaning)):
        checks[kind] = steering_check(sent, hits, flags, "best_prompt_dev", hits["best_prompt"])
        if "selector" in hits:  # the selector's own picks were not kept: its verdicts as recorded
            versus = steering_check(sent, hits, flags, "best_prompt_dev", hits["selector"])
            for name, row in checks[kind].items():
                row["vs_selector_without_steering"] = versus[name]["vs_reference_without_steering"]
    out = {
        "benchmark": "steering_recheck", "run": args.result_dir.as_posix(), "run_commit": results["commit"],
        "task": results["task"], "target": results["target"],
        "command": " ".join(["python", Path(sys.argv[0]).as_posix(), *sys.argv[1:]]), **code,
        "environment": environment(), "dev_queries": len(dev_ex), "dev_verdicts_differing": differ,
        "pool_steering": {s: label for s, label in steering.items() if label},
        "pool_leaning": {s: label for s, label in leaning.items() if label},
        "prompts_sent": {name: {s: picks.count(s) for s in dict.fromkeys(picks)} for name, picks in sent.items()},
        "test": {"queries": len(test["ids"]), **checks}, "unchecked": unchecked, "seconds": seconds,
    }
    atomic_write_json(args.result_dir / "checks.json", out)
    atomic_write_text(args.result_dir / "checks.md", report(out, results))
    print(report(out, results))


def report(out: dict[str, Any], results: dict[str, Any]) -> str:
    def flagged(pool: dict[str, str]) -> str:
        return ", ".join(f"`{s}` → {label}" for s, label in pool.items()) or "none"

    lines = [f"# Steering and lean checks: {out['task']} on {out['target']} ({out['run']})", "",
             f"`{out['command']}` — commit `{out['commit']}`; the run at `{out['run_commit']}`. Dev answers scored "
             f"again on {out['dev_queries']} queries ({out['dev_verdicts_differing']} verdicts differ from the run's); "
             f"each QPO row's test picks rederived from its recorded policy scores and checked against its verdicts.",
             "", f"Steering prompts (one label on at least 62.5% of dev answers with 4 balanced labels, 75% with 2): "
             f"{flagged(out['pool_steering'])}.", "",
             f"Leaning prompts (a third of the way from the label's share to always: 50% with 4 labels, 66.7% with 2): "
             f"{flagged(out['pool_leaning'])}.", "",
             f"| method ({out['test']['queries']} test queries) | accuracy | sent a steering prompt | without steering: "
             "accuracy, vs best prompt, vs selector | sent a leaning prompt | without leaning: accuracy, vs best prompt, "
             "vs selector |", "|---|---:|---:|---|---:|---|"]
    methods = results["test"]["methods"]

    def gap(g: dict[str, Any] | None) -> str:
        if g is None:
            return "–"
        text = f"{100 * g['diff']:+.1f} [{100 * g['ci95'][0]:+.1f}, {100 * g['ci95'][1]:+.1f}]"
        return text if g["significant"] else text + " (n.s.)"

    for name in out["test"]["steering"]:
        cells = [f"| {name} | {100 * methods[name]['accuracy']:.1f}"]
        for kind in ("steering", "leaning"):
            check = out["test"][kind][name]
            cells.append(f"{100 * check['steered_share']:.1f}% | {100 * check['accuracy_without_steering']:.1f}, "
                         f"{gap(check['vs_reference_without_steering'])}, {gap(check.get('vs_selector_without_steering'))}")
        lines.append(" | ".join(cells) + " |")
    for name, why in out["unchecked"].items():
        lines.append(f"\n`{name}` is not checked: {why}.")
    lines += ["", "Prompts sent on test:", ""]
    lines += [f"- {name}: " + ", ".join(f"{s} {n}" for s, n in sorted(c.items(), key=lambda kv: -kv[1]))
              for name, c in out["prompts_sent"].items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
