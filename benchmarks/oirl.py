"""QPO on a 7B target through its logs: Prompt-OIRL's LLaMA-2-7B-chat correctness on GSM8K, no target calls.

The logs record whether LLaMA-2-7B-chat solved each GSM8K question with each of 6 training prompts
(every train question) and 10 more GPT-4-written prompts (the first 1,000 test questions). QPO
trains on a sample of the logged train questions (``qpo import-oirl`` then loop 1 of ``qpo train``:
later loops would have to call the 7B model) and is scored offline: for each question the policy
chooses among the logged prompts (decoding constrained to them, :func:`candidate_logps`), and the
log says whether LLaMA-2 got it right with that prompt.

Splits: ``--train-queries`` logged train questions are D0 and ``--dev-queries`` other train
questions are the validation split every choice is made on (which recipe, and which way the policy
picks: the top reward token's likelihood, or the implicit reward, top minus bottom); the test
questions are scored once per recipe. Methods, each with the 6 training prompts as candidates:

* ``best_prompt`` — the prompt with the best D0 accuracy, for every question (the task-level baseline);
* ``random_prompt`` — a seeded random training prompt per question;
* ``selector`` — the Prompt-OIRL-style reward model (:mod:`qpo_middleware.training.selector`) fit on
  the same D0 picks the prompt;
* ``qpo_<recipe>_likelihood`` — the prompt the policy finds most likely after the top reward token;
* ``qpo_<recipe>_implicit`` — the prompt the top reward token favours most over the bottom one;
* ``oracle`` — a question counts when any candidate was right: an upper bound, not a method.

    python benchmarks/oirl.py --train-queries 300 --dev-queries 150 --out benchmarks/results/oirl-cpu

Writes ``OUT/results.json`` (command, commit, hardware, settings, the validation scores that chose,
and per method accuracy with paired 95% intervals against ``best_prompt`` and ``selector``) and
``OUT/report.md``; runs and per-split scores stay under ``OUT/runs/`` (ignored by git), so a re-run
resumes: finished trainings and scored splits are reused.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from qpo_bench.environment import code_version, environment
from qpo_bench.offline import (
    RECIPES,
    RULES,
    TRAIN,
    gsm8k_logs,
    logged,
    method_line,
    method_row,
    policy_choices,
    recipe_dir,
    reference_model,
    rules_of,
    train_recipes,
)
from qpo_middleware.training.dataset import OfflineDataset, Record
from qpo_middleware.training.io import atomic_write_json
from qpo_middleware.training.oirl import BASE_ALIASES, import_prompt_oirl
from qpo_middleware.training.run import RunPaths
from qpo_middleware.training.selector import Selector


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train-queries", type=int, default=300)
    parser.add_argument("--dev-queries", type=int, default=150)
    parser.add_argument("--test-queries", type=int, default=1000, help="First N of the 1,000 logged test questions.")
    parser.add_argument("--recipes", default="paper,query_rank,query_rank_dpo", help=f"Comma list of {', '.join(RECIPES)}.")
    parser.add_argument("--test-recipes", default="paper,chosen",
                        help="Recipes scored on test ('chosen' = the best on the dev split); each once.")
    parser.add_argument("--held-out-queries", type=int, default=0,
                        help="Also score the chosen recipe and rule choosing among all 16 logged prompts (the 10 "
                             "GPT-4 prompts never seen in training) on the first N test questions (0 = off).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/oirl-cpu"))
    args = parser.parse_args()
    started, code = time.perf_counter(), code_version()
    out, runs = args.out, args.out / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    recipes = [r for r in args.recipes.split(",") if r]
    unknown = [r for r in recipes if r not in RECIPES]
    if unknown:
        sys.exit(f"Unknown recipe(s) {unknown}; use {', '.join(RECIPES)}.")

    # -- logs: every train question (6 prompts) and the 1,000 test questions -------------------------
    train_outcomes, test_outcomes, texts, _ = gsm8k_logs(runs)
    ids = sorted(train_outcomes, key=lambda i: int(i.rsplit("-", 1)[1]))
    random.Random(args.seed).shuffle(ids)
    d0_ids, dev_ids = ids[: args.train_queries], ids[args.train_queries : args.train_queries + args.dev_queries]
    test_ids = [f"gsm8k-test-{i}" for i in range(1, args.test_queries + 1)]

    # -- D0 for every recipe: the same questions, prompt accuracies over D0 alone ---------------------
    d0_dir = runs / f"d0_seed{args.seed}_n{args.train_queries}"
    if not RunPaths(d0_dir).dataset.is_file():
        import_prompt_oirl(None, "gsm8k", d0_dir, split="train", query_ids=d0_ids)
    d0: list[Record] = list(OfflineDataset(d0_dir))
    prompts = sorted({r.prompt for r in d0}, key=lambda p: BASE_ALIASES.index(
        next(r.prompt_source for r in d0 if r.prompt == p).removeprefix("oirl:")))
    accuracy = {p: statistics.fmean(r.correct for r in d0 if r.prompt == p) for p in prompts}
    best = max(prompts, key=lambda p: accuracy[p])
    selector = Selector.fit(d0)
    aliases = {r.prompt: r.prompt_source.removeprefix("oirl:") for r in d0}
    picked: dict[str, Counter[str]] = {}  # "<split>:<method>" -> how often each prompt was sent

    def baselines(split_ids: list[str], outcomes: dict[str, dict[str, bool]]) -> dict[str, list[bool]]:
        rng = random.Random(args.seed)
        queries = [texts[i] for i in split_ids]
        predicted = [selector.predict(q, prompts) for q in queries]
        picks = [prompts[max(range(len(prompts)), key=p.__getitem__)] for p in predicted]
        picked[f"{'test' if outcomes is test_outcomes else 'dev'}:selector"] = Counter(aliases[p] for p in picks)
        return {
            "best_prompt": [outcomes[i][best] for i in split_ids],
            "random_prompt": [outcomes[i][rng.choice(prompts)] for i in split_ids],
            "selector": [outcomes[i][p] for i, p in zip(split_ids, picks, strict=True)],
            "oracle": [any(outcomes[i][p] for p in prompts) for i in split_ids],
        }

    # -- train each recipe (loop 1 on the imported D0; resumes) ----------------------------------------
    def prepare(run_dir: Path) -> None:
        for path in RunPaths(d0_dir).dataset, RunPaths(d0_dir).imported:
            (run_dir / path.name).parent.mkdir(parents=True, exist_ok=True)
            (run_dir / path.name).write_bytes(path.read_bytes())

    suffix = f"seed{args.seed}_n{args.train_queries}"
    timings = train_recipes(runs, recipes, suffix, prepare, seed=args.seed)

    def qpo_hits(recipe: str, split: str, split_ids: list[str],
                 outcomes: dict[str, dict[str, bool]]) -> tuple[dict[str, list[bool]], float]:
        run_dir = recipe_dir(runs, recipe, suffix)
        choices = policy_choices(run_dir, [texts[i] for i in split_ids], prompts,
                                 run_dir / f"choices_{split}_{len(split_ids)}.json", rules=RULES,
                                 reference=reference_model(runs, recipe, suffix), seed=args.seed)
        for rule in rules_of(choices):
            picked[f"{split}:qpo_{recipe}_{rule}"] = Counter(aliases[prompts[c]] for c in choices[rule])
        return ({f"qpo_{recipe}_{rule}": [outcomes[i][prompts[c]] for i, c in zip(split_ids, choices[rule], strict=True)]
                 for rule in rules_of(choices)}, choices["seconds_per_query"])

    # -- validation: choose the recipe and the rule -------------------------------------------------
    dev = baselines(dev_ids, train_outcomes)
    dev_seconds = {}
    for recipe in recipes:
        hits, dev_seconds[recipe] = qpo_hits(recipe, "dev", dev_ids, train_outcomes)
        dev.update(hits)
    dev_scores = {name: statistics.fmean(h) for name, h in dev.items()}
    qpo_dev = {name: score for name, score in dev_scores.items() if name.startswith("qpo_")}
    chosen = max(qpo_dev, key=qpo_dev.__getitem__)
    chosen_recipe = next(r for r in recipes if chosen.startswith(f"qpo_{r}_") and chosen.removeprefix(f"qpo_{r}_") in RULES)

    # -- test: each listed recipe once -------------------------------------------------------------
    test = baselines(test_ids, test_outcomes)
    test_recipes = [chosen_recipe if r == "chosen" else r for r in args.test_recipes.split(",") if r]
    test_seconds = {}
    for recipe in dict.fromkeys(r for r in test_recipes if r in recipes):
        hits, test_seconds[recipe] = qpo_hits(recipe, "test", test_ids, test_outcomes)
        test.update(hits)
    reference = {"best_prompt": test["best_prompt"], "selector": test["selector"]}
    methods = {name: method_row(h, {k: v for k, v in reference.items() if k != name}) for name, h in test.items()}

    # -- held-out prompts: the chosen recipe and rule choose among all 16 logged prompts -------------
    held_out: dict[str, Any] = {}
    if args.held_out_queries and chosen.removeprefix(f"qpo_{chosen_recipe}_") == "choose":
        # Training records offsets for the library it saw (the 6 logged training prompts) only.
        held_out = {"skipped": "rule 'choose' needs an offset for every candidate; training recorded them for "
                               "the 6 training prompts only"}
    elif args.held_out_queries:
        all_logs = runs / "logs_test_all"
        if not RunPaths(all_logs).dataset.is_file():
            import_prompt_oirl(None, "gsm8k", all_logs, split="test", prompts="all")
        outcomes16 = logged(all_logs)
        ids16 = test_ids[: args.held_out_queries]
        prompts16 = [*prompts, *sorted({p for i in ids16 for p in outcomes16[i]} - set(prompts))]
        rule = chosen.removeprefix(f"qpo_{chosen_recipe}_")
        run_dir = recipe_dir(runs, chosen_recipe, suffix)
        picks16 = policy_choices(run_dir, [texts[i] for i in ids16], prompts16,
                                 run_dir / f"choices_test16_{len(ids16)}_{rule}.json", rules=(rule,),
                                 reference=reference_model(runs, chosen_recipe, suffix), seed=args.seed)
        predicted = [selector.predict(texts[i], prompts16) for i in ids16]
        hits16 = {
            "best_prompt": [outcomes16[i][best] for i in ids16],
            "selector_16": [outcomes16[i][prompts16[max(range(len(prompts16)), key=p.__getitem__)]]
                            for i, p in zip(ids16, predicted, strict=True)],
            f"{chosen}_16": [outcomes16[i][prompts16[c]] for i, c in zip(ids16, picks16[rule], strict=True)],
            "oracle_16": [any(outcomes16[i].values()) for i in ids16],
            "oracle_6": [any(outcomes16[i][p] for p in prompts) for i in ids16],
        }
        ref16 = {"best_prompt": hits16["best_prompt"], "selector": hits16["selector_16"]}
        held_out = {
            "queries": len(ids16), "prompts": len(prompts16), "rule": rule, "recipe": chosen_recipe,
            "methods": {name: method_row(h, {k: v for k, v in ref16.items() if v is not h})
                        for name, h in hits16.items()},
            "prompt_accuracy": {p[:60]: statistics.fmean(outcomes16[i][p] for i in ids16) for p in prompts16},
            "seconds_per_query": picks16["seconds_per_query"],
            "qpo_prompts_sent": dict(Counter(prompts16[c][:60] for c in picks16[rule]).most_common()),
        }

    results = {
        "benchmark": "oirl", "dataset": "gsm8k", "target": "oirl:llama-2-7b-chat (logged)",
        "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        **code,
        "environment": environment(),
        "settings": {"train_queries": args.train_queries, "dev_queries": args.dev_queries,
                     "test_queries": args.test_queries, "seed": args.seed, "train": TRAIN,
                     "recipes": {r: RECIPES[r] for r in recipes}},
        "d0": {"queries": len({r.query_id for r in d0}), "records": len(d0),
               "prompt_accuracy": {next(r.prompt_source for r in d0 if r.prompt == p): a for p, a in accuracy.items()},
               "best_prompt": next(r.prompt_source for r in d0 if r.prompt == best)},
        "validation": {"scores": dev_scores, "chosen": chosen, "chosen_recipe": chosen_recipe,
                       "seconds_per_query": dev_seconds},
        "prompts_sent": {k: dict(v.most_common()) for k, v in picked.items()},
        "test": {"methods": methods, "recipes_scored": list(dict.fromkeys(test_recipes)),
                 "seconds_per_query": test_seconds},
        "held_out_prompts": held_out,
        "timings": {**timings, "total_seconds": time.perf_counter() - started},
    }
    atomic_write_json(out / "results.json", results)
    (out / "report.md").write_text(report(results), encoding="utf-8")
    print((out / "report.md").read_text(encoding="utf-8"))


def report(results: dict[str, Any]) -> str:
    s, d0, val, test = results["settings"], results["d0"], results["validation"], results["test"]
    lines = [
        "# QPO on LLaMA-2-7B-chat through its logs (GSM8K, Prompt-OIRL)", "",
        f"`{results['command']}` — commit `{results['commit']}`{' (uncommitted changes)' if results['dirty'] else ''}, "
        f"{results['environment'].get('cpu_model')}, {results['environment'].get('cpu_cores_usable')} cores", "",
        f"D0: {d0['queries']} logged train questions x 6 prompts ({d0['records']} records); dev: {s['dev_queries']} "
        f"other train questions; test: the first {s['test_queries']} GSM8K test questions. Best D0 prompt: "
        f"`{d0['best_prompt']}`.", "",
        "## Validation (chooses the recipe and how the policy picks)", "",
        "| method | dev accuracy |", "|---|---:|",
        *[f"| {k} | {100 * v:.1f} |" for k, v in sorted(val["scores"].items(), key=lambda kv: -kv[1])],
        "", f"Chosen: `{val['chosen']}`.", "",
        "## Test (each recipe scored once)", "",
        "| method | accuracy % [95% CI] | vs best prompt [95% CI] | vs selector [95% CI] |", "|---|---|---|---|",
    ]
    lines += [method_line(name, row) for name, row in test["methods"].items()]
    lines += ["", "Prompts sent on test (count per prompt):", ""]
    lines += [f"- {k.removeprefix('test:')}: " + ", ".join(f"{a} {n}" for a, n in v.items())
              for k, v in results["prompts_sent"].items() if k.startswith("test:")]
    held = results.get("held_out_prompts") or {}
    if "skipped" in held:
        lines += ["", f"Held-out prompts: not scored ({held['skipped']})."]
    elif held:
        lines += ["", f"## Held-out prompts: all {held['prompts']} logged prompts as candidates "
                      f"(first {held['queries']} test questions; `{held['recipe']}`, rule `{held['rule']}`)", "",
                  "| method | accuracy % [95% CI] | vs best prompt [95% CI] | vs selector [95% CI] |", "|---|---|---|---|"]
        lines += [method_line(name, row) for name, row in held["methods"].items()]
    lines += ["", "Policy scoring cost per question (6 prompts x 2 reward tokens, CPU): " + ", ".join(
        f"{k} {v:.2f} s" for k, v in test["seconds_per_query"].items()), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
