"""How far new prompts raise the routing ceiling of a finished ``pool_choice.py`` testbed, before any training.

A router among the pool (QPO's ``choose``, the selector, a label router) cannot beat its pool's ceilings: the best
single prompt, the *gold-label routes* (per gold label the prompt right most often on that label's dev queries,
applied to test) and the pool oracle. On SmolLM2 ag_news the gold-label routes gain +6.7 over the best train
prompt, short of the +7 bar, so the bar needs new prompts. This scores a source of new prompts on the testbed's
dev queries and fully scored test queries and reports the three ceilings with and without them, so a source
is judged in minutes of target time instead of a training run. A source passes when the gold-route and oracle
ceilings with it gain more than +7 over the best train prompt and the pool's own do not (on too few test queries
the pool alone may clear the bar: then there is no verdict).

Sources:

- ``--mutate N``: N variations of the ``--from-top`` best dev prompts, written by the inducer
  (:func:`qpo_middleware.training.induce.mutate`, the loops' ``--mutations`` step; default the embedded Qwen);
- ``--prompts-file``: one prompt per line, written anywhere.

New prompts, mutated or from the file, pass induction's filters (:func:`~qpo_middleware.training.induce.filter_candidates`),
which drop among others those naming exactly one label word: they lean the answer instead of instructing. The
ceilings also leave out any pool prompt that does, listing them. When a pool prompt (by the testbed's dev answers)
or a new one steers the target to one label, a third set of ceilings leaves the steering prompts out too. Verdicts are
cached under ``<out>/runs/`` (git-ignored), so a re-run pays only for new pairs. Writes
``ceiling_<name>.json`` and ``ceiling_<name>.md`` next to ``per_query.json``, and ``ceiling_<name>_pool.json``: the
pool with the kept new prompts, a ``--prompts`` file for ``pool_choice.py``.

    python benchmarks/pool_ceiling.py benchmarks/results/pool-choice-grid/ag_news-seed0-n1000x5 --mutate 16
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any

from qpo_bench.environment import code_version, environment
from qpo_bench.harness import label_routing
from qpo_bench.offline import method_line, method_row, open_pool_choice_run
from qpo_middleware.training.collect import score_pairs
from qpo_middleware.training.config import CollectConfig
from qpo_middleware.training.induce import Candidate, filter_candidates, make_inducer, mutate
from qpo_middleware.training.io import atomic_write_json, atomic_write_text
from qpo_middleware.training.targets import Pair, Score, make_target
from qpo_middleware.training.tasks import names_one_label, steered_label

BAR = 0.07  # the SmolLM2 bar: at least 7 points over the best train prompt


def ceilings(dev: list[list[bool]], test: list[list[bool]], dev_golds: list[str], test_golds: list[str],
             columns: list[int]) -> dict[str, Any]:
    """The ceilings of the prompts in ``columns`` (grid rows x columns of verdicts): which prompt dev finds best
    and its test verdicts, the gold-label routes dev finds and their test verdicts, and the oracle's."""
    best = max(columns, key=lambda j: (sum(row[j] for row in dev), -columns.index(j)))
    routes = label_routing([[Score(correct=hit) for hit in row] for row in dev], dev_golds, columns)
    return {
        "best_prompt_dev": {"column": best, "hits": [row[best] for row in test]},
        "gold_routes": {"routes": routes, "hits": [row[routes[g]] for row, g in zip(test, test_golds, strict=True)]},
        "oracle": {"hits": [any(row[j] for j in columns) for row in test]},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("result_dir", type=Path, help="A pool_choice.py result directory (with per_query.json).")
    parser.add_argument("--mutate", type=int, default=0, help="Variations of the best dev prompts to write and score.")
    parser.add_argument("--from-top", type=int, default=4, help="How many of the best dev prompts --mutate varies.")
    parser.add_argument("--plain", action="store_true",
                        help="--mutate varies only pool prompts that do not steer the target (the testbed's "
                             "pool_steering; collect's --mutate-plain).")
    parser.add_argument("--inducer", default=None,
                        help="The model writing the variations (a local model name, or module:factory for a LangChain "
                             "chat model; default: collect's inducer, the embedded Qwen).")
    parser.add_argument("--prompts-file", type=Path, default=None, help="New prompts, one per line.")
    parser.add_argument("--test-queries", type=int, default=0,
                        help="Score on the first N fully scored test queries (0 = all of them).")
    parser.add_argument("--name", default=None, help="Output suffix (default: 'mutate' or the file's stem).")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not args.mutate and args.prompts_file is None:
        sys.exit("Nothing to score: pass --mutate N or --prompts-file FILE.")
    if args.prompts_file is not None and not args.prompts_file.is_file():
        sys.exit(f"--prompts-file {args.prompts_file}: not found; pass a text file with one prompt per line.")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    code = code_version()
    results, per_query, task, splits = open_pool_choice_run(args.result_dir)
    settings = results["settings"]
    if settings.get("induce"):
        sys.exit("This testbed's pool was induced; score new prompts on the given-pool testbed it grew from.")
    texts = {entry["source"]: entry["text"] for entry in results["pool"]}
    sources = per_query["prompts"]  # grid columns
    pool = [texts[s] for s in sources]
    split_rows = {split: per_query["splits"][split] for split in ("dev", "test")}
    dev_ex = list(splits.collect)
    scored_test = [qid for qid in split_rows["test"]["ids"] if qid in split_rows["test"]["grid"]]
    if args.test_queries:
        scored_test = scored_test[: args.test_queries]
    wanted = set(scored_test)
    test_ex = [e for e in splits.test if e.id in wanted]
    if [e.id for e in dev_ex] != [qid for qid in split_rows["dev"]["ids"] if qid in split_rows["dev"]["grid"]]:
        sys.exit("Not every dev query of this run has the full grid; rerun pool_choice.py to finish it.")

    # -- the new prompts -------------------------------------------------------------------------------------------
    dev_grid = [[b == "1" for b in split_rows["dev"]["grid"][e.id]] for e in dev_ex]
    labels = list(task.labels)
    leaks = {p for p in pool if names_one_label(p, labels)}
    steering = set(results.get("pool_steering", {}))
    if args.plain and "pool_steering" not in results:
        sys.exit("--plain needs the testbed's pool_steering; rerun pool_choice.py on it to record the check.")
    order = sorted((j for j, p in enumerate(pool) if p and p not in leaks and not (args.plain and sources[j] in steering)),
                   key=lambda j: (-sum(row[j] for row in dev_grid), j))
    if args.mutate and not order:
        sys.exit("No pool prompt to vary: each is empty, names one label word or (with --plain) steers the target.")
    candidates: list[dict[str, Any]] = []
    t, timings = time.perf_counter(), {}
    if args.mutate:
        originals = [pool[order[i % min(args.from_top, len(order))]] for i in range(args.mutate)]
        inducer_spec = args.inducer or CollectConfig().inducer
        for original, c in zip(originals, mutate(task, originals, make_inducer(inducer_spec), seed=args.seed,
                                                 existing=pool), strict=True):
            candidates.append({"source": c.source, "of": sources[pool.index(original)], "text": c.text,
                               "raw": c.raw, "dropped": c.reason})
    if args.prompts_file is not None:
        lines = [line.strip() for line in args.prompts_file.read_text(encoding="utf-8").splitlines()]
        written = [Candidate(f"file:{i}", "", line, line, []) for i, line in enumerate(p for p in lines if p)]
        for c in filter_candidates(written, labels=labels, examples={}, existing=pool):  # induction's filters
            candidates.append({"source": c.source, "of": None, "text": c.text, "raw": c.raw, "dropped": c.reason})
    kept = [c for c in candidates if c["dropped"] is None]
    timings["write"] = time.perf_counter() - t
    logging.info("Scoring %d new prompt(s) (of %d candidates) on %d dev and %d test queries",
                 len(kept), len(candidates), len(dev_ex), len(test_ex))

    # -- score them on every dev and fully scored test query (cached) ------------------------------------------------
    name = args.name or ("mutate" if args.mutate else args.prompts_file.stem)
    cache = args.result_dir.parent / "runs" / f"{args.result_dir.name}-ceiling" / "scores.sqlite"
    cache.parent.mkdir(parents=True, exist_ok=True)
    target = make_target(settings["target"], cache_path=cache)
    t = time.perf_counter()
    verdicts: dict[str, dict[str, bool]] = {}
    answers: dict[str, dict[str, str | None]] = {}
    pairs = [Pair(e, c["text"], c["source"]) for e in [*dev_ex, *test_ex] for c in kept]
    for pair, score in zip(pairs, score_pairs(target, task, pairs), strict=True):
        verdicts.setdefault(pair.example.id, {})[pair.prompt] = bool(score.correct)  # failed = wrong
        answers.setdefault(pair.example.id, {})[pair.prompt] = score.prediction
    timings["score"] = time.perf_counter() - t
    dev_golds, test_golds = [task.gold_text(e) for e in dev_ex], [task.gold_text(e) for e in test_ex]
    for c in kept:
        for split, exs in (("dev", dev_ex), ("test", test_ex)):
            c[f"{split}_hits"] = "".join("1" if verdicts[e.id][c["text"]] else "0" for e in exs)
            c[f"{split}_accuracy"] = c[f"{split}_hits"].count("1") / len(exs)
        # The behavioural leakage check: the label this prompt makes the target answer on most dev queries, if any.
        c["steers"] = steered_label([answers[e.id][c["text"]] for e in dev_ex], dev_golds)

    # -- ceilings: the pool, then the pool with the new prompts (leaky prompts left out of both) ---------------------
    every = pool + [c["text"] for c in kept]

    def grid(split_examples: list[Any], split: str) -> list[list[bool]]:
        rows = split_rows[split]["grid"]
        return [[b == "1" for b in rows[e.id]] + [verdicts[e.id][c["text"]] for c in kept] for e in split_examples]

    dev_rows, test_rows = grid(dev_ex, "dev"), grid(test_ex, "test")
    best_train = results["d0"]["best_prompt"]
    reference = {"best_prompt": [row[sources.index(best_train)] for row in test_rows]}
    honest = [j for j, p in enumerate(every) if p not in leaks]
    sets = {"pool": [j for j in honest if j < len(pool)], "pool_and_new": honest}
    # Steering prompts (pool ones as pool_choice found on dev, new ones here) answer for the query as a route:
    # the ceiling without them is the room a route can win by prompting alone.
    steers = [j for j in honest if (sources[j] in steering if j < len(pool) else kept[j - len(pool)]["steers"])]
    if steers:
        sets["pool_no_steering"] = [j for j in sets["pool"] if j not in steers]
        sets["pool_and_new_no_steering"] = [j for j in honest if j not in steers]
    table: dict[str, Any] = {}
    for label, columns in sets.items():
        found = ceilings(dev_rows, test_rows, dev_golds, test_golds, columns)
        table[label] = {
            "prompts": len(columns),
            "best_prompt_dev": {"prompt": _source(found["best_prompt_dev"]["column"], sources, kept),
                                **method_row(found["best_prompt_dev"]["hits"], reference)},
            "gold_routes": {"routes": {g: _source(j, sources, kept) for g, j in found["gold_routes"]["routes"].items()},
                            **method_row(found["gold_routes"]["hits"], reference)},
            "oracle": method_row(found["oracle"]["hits"], reference),
        }
    def clears(row: dict[str, Any]) -> bool:
        return all(row[k]["vs_best_prompt"]["diff"] > BAR for k in ("gold_routes", "oracle"))

    # On too few queries the pool alone may clear the bar (ag_news seed 0: +10 on the first 100 test queries,
    # +6.7 on all 300); then these queries cannot tell whether the new prompts do: no verdict.
    passes = None if clears(table["pool"]) else clears(table["pool_and_new"])
    out = {
        "benchmark": "pool_ceiling", "testbed": args.result_dir.as_posix(), "task": results["task"],
        "target": results["target"], "command": " ".join(["python", Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        **code, "environment": environment(),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "queries": {"dev": len(dev_ex), "test": len(test_ex)}, "best_train_prompt": best_train,
        "leaky_pool_prompts": [sources[pool.index(p)] for p in leaks],
        "candidates": candidates, "ceilings": table, "passes": passes, "timings": timings,
    }
    atomic_write_json(args.result_dir / f"ceiling_{name}.json", out)
    # The grown pool as a --prompts file for pool_choice.py (the empty prompt comes on top there by itself).
    atomic_write_json(args.result_dir / f"ceiling_{name}_pool.json", {"prompts": [
        *({"id": s.split(":", 1)[-1], "text": texts[s]} for s in sources if texts[s]),
        *({"id": c["source"].replace(":", "-"), "text": c["text"]} for c in kept)]})
    atomic_write_text(args.result_dir / f"ceiling_{name}.md", report(out))
    print(report(out))


def _source(column: int, sources: list[str], kept: list[dict[str, Any]]) -> str:
    return sources[column] if column < len(sources) else kept[column - len(sources)]["source"]


def report(out: dict[str, Any]) -> str:
    q = out["queries"]
    lines = [f"# Pool ceilings with new prompts: {out['task']} on {out['target']} ({out['testbed']})", "",
             f"`{out['command']}` (commit `{out['commit']}`{', dirty' if out.get('dirty') else ''})", "",
             f"Dev chooses (the best prompt, the gold-label routes) on {q['dev']} queries; test is the first "
             f"{q['test']} fully scored test queries. Gaps are to the best train prompt (`{out['best_train_prompt']}`), "
             "paired 95% intervals.", "",
             "| prompts | ceiling | test accuracy | vs best train prompt |", "|---|---|---:|---:|"]
    for label, row in out["ceilings"].items():
        for kind in ("best_prompt_dev", "gold_routes", "oracle"):
            cells = method_line(f"{label} ({row['prompts']})", row[kind], ("best_prompt",)).split(" | ", 1)
            lines.append(f"{cells[0]} | {kind} | {cells[1]}")
    kept = [c for c in out["candidates"] if c["dropped"] is None]
    dropped: dict[str, int] = {}
    for c in out["candidates"]:
        if c["dropped"]:
            dropped[c["dropped"]] = dropped.get(c["dropped"], 0) + 1
    verdict = {True: "Passes", False: "Does not pass",
               None: "No verdict: the pool alone already clears the bar on these queries (score more test queries)"}
    lines += ["", f"**{verdict[out['passes']]}**. A source passes when the gold-route and oracle ceilings with the "
              f"new prompts gain more than +{100 * BAR:.0f} points over the best train prompt, and the pool's own do not.",
              "",
              f"Candidates: {len(out['candidates'])}, kept {len(kept)}"
              + (f", dropped {', '.join(f'{k} {v}' for k, v in dropped.items())}" if dropped else "") + ".",
              f"Leaky pool prompts left out: {', '.join(out['leaky_pool_prompts']) or 'none'}.", "",
              "A new prompt *steers* when the target answers one label on most dev queries with it "
              "(`tasks.steered_label`): as a route it answers for the query, as a prompt naming the label would.", "",
              "| source | varies | dev | test | steers to | text |", "|---|---|---:|---:|---|---|"]
    for c in sorted(kept, key=lambda c: -c["dev_accuracy"]):
        text = c["text"].replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {c['source']} | {c['of'] or '—'} | {100 * c['dev_accuracy']:.1f} | "
                     f"{100 * c['test_accuracy']:.1f} | {c.get('steers') or '—'} | {text} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
