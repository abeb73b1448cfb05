"""A per-prompt success head on the policy base's own features, measured on a finished ``pool_choice.py`` run.

The Prompt-OIRL-style selector predicts ``P(correct | query, prompt)`` from hashed words and character n-grams.
On the runs so far the gain over the best prompt is routing by label, and a linear probe of the untrained
policy base reads the label far better than hashed features do (``benchmarks/label_router.py --features
policy``). This fits the selector's own model, ``logit(q, p) = b_p + x(q) . (w + V_p)``
(:func:`qpo_middleware.training.selector.fit_outcome_model`), on the run's D0 with ``x`` the policy base's
mask-averaged hidden state at one layer (:mod:`qpo_bench.features`), and sends each query the pool prompt with
the highest predicted success. Unlike the label router it reads no gold label, only D0's verdicts, so it serves
any task with a reward.

The layer and the per-prompt L2 are chosen on dev (every pool prompt scored on each dev query); test is then
scored once, with the chosen setting, on the fully scored test queries (``--bound-queries``; 0 scores every
test query), with paired intervals against the best train prompt, the selector and the run's QPO row (the
recipe and rule dev chose). The hashed-feature fit is reported beside it as a check: with cross-validated L2 it
is the run's selector. Writes ``choice_head.json`` and ``choice_head.md`` next to ``per_query.json``. D0's
verdicts come from ``per_query.json`` (``pool_choice.py`` keeps them there); a run recorded before that needs its D0
directory (``<out>/runs/<name>/d0``, or ``--d0``).

    python benchmarks/choice_head.py benchmarks/results/pool-choice-grid/ag_news-seed0-n1000x5
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from qpo_bench.environment import code_version
from qpo_bench.features import policy_feature_sets
from qpo_bench.offline import d0_table, d0_verdicts, method_line, method_row, open_pool_choice_run
from qpo_middleware.training.dataset import OfflineDataset
from qpo_middleware.training.io import atomic_write_json, atomic_write_text
from qpo_middleware.training.run import RunPaths
from qpo_middleware.training.selector import SelectorConfig, fit_outcome_model, outcome_logits, text_features

# The head's features, by kind (qpo_bench.features): hidden states, and the attention values the runtime's KV
# cache already holds. Each kind gets its own setting chosen on dev and its own test row.
KINDS = {"hidden": "layer", "values": "values"}
HEAD_NAMES = {"head_hidden": "success head on hidden states", "head_values": "success head on attention values"}
# Standardised dense hidden states need a stronger prior than the sparse hashed features' (1e-4 .. 1e-2).
POLICY_L2_GRID = (1e-3, 1e-2, 1e-1)


def head_picks(x_fit: np.ndarray, hits: np.ndarray, counts: np.ndarray, config: SelectorConfig,
               columns: list[int], *xs: np.ndarray) -> tuple[float, list[list[int]]]:
    """Fit on D0 and return (the L2 used, per split of ``xs`` the grid column each query is sent)."""
    params, l2, _ = fit_outcome_model(x_fit, hits, counts, config)
    return l2, [[columns[int(i)] for i in outcome_logits(params, x).argmax(1)] for x in xs]


def accuracy(grid: list[str], picks: list[int]) -> float:
    return statistics.fmean(row[j] == "1" for row, j in zip(grid, picks, strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("result_dir", type=Path, help="A pool_choice.py result directory (with per_query.json).")
    parser.add_argument("--d0", type=Path, default=None,
                        help="The run's D0 directory (default: <out>/runs/<name>/d0 beside the result directory).")
    parser.add_argument("--base", default=None,
                        help="The local base model whose hidden states are the features (default: the default "
                             "policy base). Another base writes choice_head_<base>.*.")
    args = parser.parse_args()
    code = code_version()
    results, per_query, task, splits = open_pool_choice_run(args.result_dir)
    settings = results["settings"]
    dev, test = per_query["splits"]["dev"], per_query["splits"]["test"]
    sources = per_query["prompts"]  # grid columns
    column_of = {entry["text"]: sources.index(entry["source"]) for entry in results["pool"]}

    # -- D0: the verdicts the head learns from (no gold label read) ---------------------------------------------
    d0 = per_query.get("d0")
    if d0 is None or args.d0 is not None:  # a run recorded before per_query.json kept D0: read its directory
        d0_dir = args.d0 or args.result_dir.parent / "runs" / re.sub(r"-t\d+$", "", args.result_dir.name) / "d0"
        if not RunPaths(d0_dir).dataset.is_file():
            sys.exit(f"{d0_dir}: no D0 run there, and per_query.json does not hold D0's verdicts; pass the run's D0 "
                     "directory with --d0 (pool_choice.py keeps it under <out>/runs/<name>/d0), or rerun "
                     "pool_choice.py, whose per_query.json now keeps them.")
        records = OfflineDataset(d0_dir).loop(0)
        if missing := sorted({r.prompt for r in records} - set(column_of))[:2]:
            sys.exit(f"D0 holds prompts that are not in the run's pool ({missing}...): wrong --d0 for this run.")
        d0 = d0_verdicts(records, column_of)
    ids, columns, hits, counts = d0_table(d0)
    train_by_id = {e.id: e for e in splits.train}
    if unknown := [qid for qid in ids if qid not in train_by_id][:3]:
        sys.exit(f"D0 queries {unknown} are not in the {settings['task']} train split drawn from $QPO_DATA: "
                 "use the data the run was made with.")
    texts = [train_by_id[qid].query for qid in ids]
    by_id = {e.id: e for e in [*splits.collect, *splits.test]}
    bound_ids = [qid for qid in test["ids"] if qid in test["grid"]]
    dev_texts, test_texts = [by_id[q].query for q in dev["ids"]], [by_id[q].query for q in bound_ids]
    dev_grid, test_grid = [dev["grid"][q] for q in dev["ids"]], [test["grid"][q] for q in bound_ids]

    # -- candidates: the selector's own features (a check) and each policy layer x L2; chosen on dev ------------
    selector_config = SelectorConfig()
    hashed = [text_features(t, selector_config.dim) for t in (texts, dev_texts, test_texts)]
    candidates: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, SelectorConfig]] = {
        "hashed (the selector)": (*hashed, selector_config)}
    sets = policy_feature_sets(texts, dev_texts, test_texts, base=args.base, kinds=tuple(KINDS))
    for name, (x_fit, x_dev, x_test) in sets.items():
        for l2 in POLICY_L2_GRID:
            candidates[f"policy {name}, l2 {l2:g}"] = (x_fit, x_dev, x_test,
                                                       replace(selector_config, l2_prompt=l2, cv_folds=0))
    dev_scores: dict[str, float] = {}
    test_picks: dict[str, list[int]] = {}
    for name, (x_fit, x_dev, x_test, config) in candidates.items():
        l2, (dev_pick, test_pick) = head_picks(x_fit, hits, counts, config, columns, x_dev, x_test)
        dev_scores[name] = accuracy(dev_grid, dev_pick)
        test_picks[name] = test_pick
        print(f"{name} (l2 {l2:g}): dev {100 * dev_scores[name]:.1f}", file=sys.stderr)
    chosen = {f"head_{kind}": max((n for n in candidates if n.startswith(f"policy {KINDS[kind]} ")),
                                  key=dev_scores.__getitem__)  # ties: the first (shallower layer, weaker L2)
              for kind in KINDS}

    # -- test, once, with the chosen setting -------------------------------------------------------------------
    qpo = results["validation"]["chosen"]  # None when the run trained no recipe
    position = {qid: i for i, qid in enumerate(test["ids"])}
    references = {"best_prompt": "best_prompt", "selector": "selector", **({"qpo": qpo} if qpo else {})}
    hits_test = {name: [test["hits"][key][position[q]] == "1" for q in bound_ids] for name, key in references.items()}
    for head, name in chosen.items():
        hits_test[head] = [row[j] == "1" for row, j in zip(test_grid, test_picks[name], strict=True)]
    hits_test["hashed_check"] = [row[j] == "1" for row, j in zip(test_grid, test_picks["hashed (the selector)"],
                                                                   strict=True)]
    rows = {name: method_row(h, {r: hits_test[r] for r in references if r != name}) for name, h in hits_test.items()}
    sent = {head: {sources[j]: n for j, n in Counter(test_picks[name]).most_common()} for head, name in chosen.items()}
    out = {
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        **code,
        "run": {"command": results["command"], "commit": results["commit"], "target": results["target"]},
        "task": settings["task"], "seed": settings["seed"], "base": args.base or "the default policy base",
        "d0_queries": len(texts),
        "d0_records": int(counts.sum()), "dev_queries": len(dev_grid), "test_queries": len(bound_ids),
        "dev_accuracy_by_setting": dev_scores, "chosen": chosen, "qpo_row": qpo,
        "dev": {**{head: dev_scores[name] for head, name in chosen.items()},
                "best_prompt_dev": max(accuracy(dev_grid, [j] * len(dev_grid)) for j in range(len(sources))),
                **{name: results["validation"]["scores"][key] for name, key in references.items()}},
        "prompts_sent": sent,
        "test": rows,
    }
    stem = "choice_head" + (f"_{args.base}" if args.base else "")
    atomic_write_json(args.result_dir / f"{stem}.json", out)
    atomic_write_text(args.result_dir / f"{stem}.md", report(out))
    print(report(out))


def report(out: dict[str, Any]) -> str:
    dev = out["dev"]
    lines = [
        f"# A success head on {out['base']}'s features: {out['task']} (seed {out['seed']}, target "
        f"{out['run']['target']})", "",
        f"`{out['command']}` — commit `{out['commit']}`; from the run `{out['run']['command']}` "
        f"(commit `{out['run']['commit']}`)", "",
        f"Fit on D0 ({out['d0_queries']} queries, {out['d0_records']} verdicts); each kind's setting chosen on "
        f"{out['dev_queries']} dev queries: " + ", ".join(f"**{name}**" for name in out["chosen"].values()) + ".", "",
        "| setting | dev accuracy % |", "|---|---:|",
        *[f"| {name} | {100 * score:.1f} |" for name, score in out["dev_accuracy_by_setting"].items()], "",
        "Dev: " + ", ".join(f"{HEAD_NAMES[head]} {100 * dev[head]:.1f}" for head in out["chosen"])
        + f", best dev prompt {100 * dev['best_prompt_dev']:.1f}, best train prompt {100 * dev['best_prompt']:.1f}, "
        f"selector {100 * dev['selector']:.1f}"
        + (f", QPO (`{out['qpo_row']}`) {100 * dev['qpo']:.1f}." if out["qpo_row"] else " (the run trained no QPO recipe)."),
        "",
        f"## Test (the {out['test_queries']} fully scored test queries; scored once)", "",
        "| method | accuracy % [95% CI] | vs best prompt [95% CI] | vs selector [95% CI] | vs QPO [95% CI] |",
        "|---|---|---|---|---|",
    ]
    names = {**{head: f"**{name} (chosen on dev)**" for head, name in HEAD_NAMES.items()},
             "hashed_check": "hashed features, CV L2 (the selector refit: a check)", "qpo": f"QPO `{out['qpo_row']}`"}
    lines += [method_line(names.get(name, name), row, ("best_prompt", "selector", "qpo"))
              for name, row in out["test"].items()]
    lines += [""] + [f"Prompts the {HEAD_NAMES[head]} sends on test: "
                     + ", ".join(f"`{src}` {n}" for src, n in sent.items()) + "." for head, sent in out["prompts_sent"].items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
