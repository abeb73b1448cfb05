"""QPO recipes compared on a local target's full outcome matrix: the policy chooses among the pool prompts,
each already scored on every dev and test query, so a recipe costs training time and no target call.

This is ``benchmarks/oirl.py``'s protocol with a local target instead of logs. D0 is an ordinary collect
(``--train-queries`` x ``--prompts-per-query`` of the pool, as the quality benchmark's CPU profile); the
collect split is the dev split (loop 1 never sees it) and every pool prompt is scored on every dev and
test query once (cached in D0's ``scores.sqlite``). Each recipe trains loop 1 on the same D0 (a ``*_loop2``
recipe continues its loop-1 recipe: loop 2 samples on new collect queries after the dev ones); per query
the policy picks the pool prompt it finds most likely after the top reward token (``likelihood``) or most
favoured by the top token over the bottom one (``implicit``) — decoding constrained to the pool.

The recipe and rule are chosen on dev; test is scored once per listed recipe, with its best rule on dev. Rows: ``none`` (no
instruction), ``best_prompt`` (best D0 accuracy), ``best_prompt_dev`` (best on dev, where QPO's recipe
and rule are chosen), ``random_prompt``, ``selector`` (Prompt-OIRL-style, fit on D0), ``oracle`` (any pool prompt right: a bound) and ``label_routing`` (per gold label, the prompt right
most often on that label's queries of the same split: how much of the oracle is routing by label), and, when some pool
prompts steer the target to one label on dev, ``label_routing_no_steering`` (the same among the others), and when
some lean it there, ``label_routing_no_leaning`` (among those that do not lean).

    python benchmarks/pool_choice.py --task sst2 --seed 0 --recipes paper,query_rank,query_rank_dpo

Writes ``OUT/<task>-seed<S>/results.json`` (command, commit, hardware, settings, dev scores that chose,
test rows with paired 95% intervals against ``best_prompt``, ``best_prompt_dev`` and ``selector``), ``report.md`` and
``per_query.json`` (each query's verdicts per method, the pool grid, the policy's log-probabilities); runs
stay under ``OUT/runs/`` (ignored by git) and a re-run resumes.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from quality import DEFAULT_MODEL, reuse_d0
from verdicts import seed_cache

from qpo_bench.environment import code_version, environment
from qpo_bench.harness import label_routing
from qpo_bench.offline import (
    RECIPES,
    ROUTE_RULES,
    RULES,
    TRAIN,
    d0_verdicts,
    method_line,
    method_row,
    policy_choices,
    posterior_picks,
    recipe_dir,
    reference_model,
    route_scores,
    rules_of,
    steering_check,
    train_recipes,
)
from qpo_middleware.choice import RouteTable
from qpo_middleware.training.collect import collect, score_pairs
from qpo_middleware.training.config import CollectConfig
from qpo_middleware.training.dataset import OfflineDataset
from qpo_middleware.training.io import atomic_write_json, atomic_write_text
from qpo_middleware.training.loops import completed_loops
from qpo_middleware.training.policy import label_routes, route_remap, route_table
from qpo_middleware.training.run import Run, RunPaths
from qpo_middleware.training.selector import Selector
from qpo_middleware.training.targets import Score
from qpo_middleware.training.tasks import LEAN_REACH, names_one_label, steered_label

REFERENCES = ("best_prompt", "best_prompt_dev", "selector")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="sst2")
    parser.add_argument("--target", default=DEFAULT_MODEL, help="Target LLM (the policy base is the recipes').")
    parser.add_argument("--train-queries", type=int, default=400)
    parser.add_argument("--prompts-per-query", type=int, default=5, help="Pool prompts scored per D0 query (0 = all).")
    parser.add_argument("--prompts", default="13", help="The pool (CollectConfig.prompts); the empty prompt comes on top.")
    parser.add_argument("--induce", type=int, default=0,
                        help="Also induce this many instructions into the pool (CollectConfig.induce, the embedded Qwen "
                             "writes them); a different pool needs its own --out.")
    parser.add_argument("--mutate", type=int, default=0,
                        help="Grow the pool with this many variations of D0's best prompts (CollectConfig.mutate, the "
                             "embedded Qwen writes them, scored on D0's queries too); a different pool needs its own --out.")
    parser.add_argument("--mutate-plain", action="store_true",
                        help="Vary only prompts that do not steer the target on D0 (CollectConfig.mutate_plain).")
    parser.add_argument("--dev-queries", type=int, default=150)
    parser.add_argument("--test-queries", type=int, default=300,
                        help="Held-out test queries. Not part of D0: a larger number extends the same test split "
                             "(its first queries are the smaller run's) and reuses D0, policies and verdicts.")
    parser.add_argument("--bound-queries", type=int, default=0,
                        help="Score every pool prompt on only the first N test queries (the oracle and label-routing "
                             "bounds use those); the rest are scored only on the prompts the methods send. 0 = all.")
    parser.add_argument("--recipes", default="paper,query_rank,query_rank_dpo",
                        help=f"Comma list of {', '.join(RECIPES)}; '' trains none (D0, the grids and the baselines "
                             "only: a testbed for choice rules fit offline, e.g. benchmarks/choice_head.py).")
    parser.add_argument("--test-recipes", default="paper,chosen",
                        help="Recipes scored on test ('chosen' = the best on dev); each once.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/pool-choice-cpu"))
    parser.add_argument("--verdicts-from", type=Path, default=None,
                        help="Another run of the same task and target whose scores.sqlite seeds a new D0's score "
                             "cache (verdicts are keyed by target, task, rendered input and gold, so only identical "
                             "pairs hit): a bigger D0 then pays only for its new pairs. Or a verdicts.jsonl.gz that "
                             "benchmarks/verdicts.py saved: a run resumed on a fresh machine pays only for the rest.")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    started, code = time.perf_counter(), code_version()
    recipes = [r for r in args.recipes.split(",") if r]
    if unknown := [r for r in recipes if r not in RECIPES]:
        sys.exit(f"Unknown recipe(s) {unknown}; use {', '.join(RECIPES)}.")
    shape = (args.train_queries, args.prompts_per_query)
    default_shape = (parser.get_default("train_queries"), parser.get_default("prompts_per_query"))
    name = f"{args.task}-seed{args.seed}" + ("" if shape == default_shape else "-n{}x{}".format(*shape))
    test_name = "" if args.test_queries == parser.get_default("test_queries") else f"-t{args.test_queries}"
    out, runs = args.out / (name + test_name), args.out / "runs" / name
    runs.mkdir(parents=True, exist_ok=True)

    # -- D0, and every pool prompt on every dev and test query (one target, cached) --------------------
    d0_dir = runs / "d0"
    if args.verdicts_from is not None and not d0_dir.exists():
        d0_dir.mkdir(parents=True)
        seed_cache(args.verdicts_from, RunPaths(d0_dir).scores)
    # D0 keeps the test size it was made with; the test split is drawn below at the size asked for.
    d0_test = Run.open(d0_dir).config.test_queries if RunPaths(d0_dir).run_file.is_file() else args.test_queries
    config = CollectConfig(task=args.task, target=args.target, queries=args.train_queries,
                           collect_queries=args.dev_queries, test_queries=d0_test, prompts=args.prompts, induce=args.induce, mutate=args.mutate,
                           mutate_plain=args.mutate_plain,
                           prompts_per_query=args.prompts_per_query, seed=args.seed, batch_size=16)
    run = Run.open(d0_dir, config)
    splits = run.task.splits(config.data_dir, **(config.split_args() | {"n_test": args.test_queries}))
    if [e.id for e in splits.test[:d0_test]] != [e.id for e in run.splits.test][:args.test_queries] or \
            (splits.train, splits.collect) != (run.splits.train, run.splits.collect):
        sys.exit(f"Task {args.task!r} draws its test split from the train pool, so --test-queries {args.test_queries} "
                 f"would change D0's splits; repeat --test-queries {d0_test} or use a new --out.")
    target = run.make_target()
    t = time.perf_counter()
    summary = collect(config, d0_dir, target=target)
    timings = {"collect": time.perf_counter() - t}
    pool = run.prompts()
    prompts = [text for _, text in pool]
    source = {text: src for src, text in pool}

    dev_ex, test_ex = list(run.splits.collect), list(splits.test)
    examples = {"dev": dev_ex, "test": test_ex}
    # Every pool prompt on these queries: the oracle and label-routing bounds read them.
    bounded = {"dev": dev_ex, "test": test_ex[: args.bound_queries or None]}
    outcomes: dict[str, dict[str, dict[str, bool]]] = {"dev": {}, "test": {}}
    answers: dict[str, dict[str, dict[str, str | None]]] = {"dev": {}, "test": {}}  # the target's, for steering

    def score(split: str, wanted: dict[str, list[str]]) -> None:
        """Score on the target (cached) each (query id -> prompts) pair not yet in ``outcomes[split]``."""
        table, by_id = outcomes[split], {e.id: e for e in examples[split]}
        pairs = [pair for qid, asked in wanted.items()
                 for pair in run.pairs([by_id[qid]], [(source[p], p) for p in dict.fromkeys(asked) if p not in table.get(qid, {})])]
        for pair, verdict in zip(pairs, score_pairs(target, run.task, pairs, config.chunk_size), strict=True):
            table.setdefault(pair.example.id, {})[pair.prompt] = bool(verdict.correct)  # failed = wrong
            answers[split].setdefault(pair.example.id, {})[pair.prompt] = verdict.prediction

    t = time.perf_counter()
    for split, exs in bounded.items():
        score(split, {e.id: prompts for e in exs})
    timings["score_matrices"] = time.perf_counter() - t

    d0 = OfflineDataset(d0_dir).loop(0)
    accuracy = {p: statistics.fmean(r.correct for r in d0 if r.prompt == p) for p in prompts}
    best = max(prompts, key=lambda p: (accuracy[p], -prompts.index(p)))
    # The fixed prompt dev would choose: QPO's recipe and rule are chosen on dev, so a single prompt may be too.
    dev_accuracy = {p: statistics.fmean(outcomes["dev"][e.id][p] for e in dev_ex) for p in prompts}
    best_dev = max(prompts, key=lambda p: (dev_accuracy[p], accuracy[p], -prompts.index(p)))
    selector = Selector.fit(d0)
    # The behavioural leakage check: pool prompts whose answers on dev are mostly one label, whatever the query.
    dev_golds = [run.task.gold_text(e) for e in dev_ex]
    dev_answers = {p: [answers["dev"][e.id][p] for e in dev_ex] for p in prompts} if run.task.labels else {}
    steering = {p: steered_label(a, dev_golds) for p, a in dev_answers.items()}
    # ... and, a softer line reported beside it, those that lean the target to one label (every steering prompt leans).
    leaning = {p: steered_label(a, dev_golds, LEAN_REACH) for p, a in dev_answers.items()}
    picked: dict[str, Counter[str]] = {}

    def baselines(split: str) -> dict[str, list[str]]:
        """The prompt each baseline sends to each query of ``split``."""
        exs, rng = examples[split], random.Random(args.seed)
        picks = [prompts[max(range(len(prompts)), key=s.__getitem__)]
                 for s in (selector.predict(e.query, prompts) for e in exs)]
        picked[f"{split}:selector"] = Counter(source[p] for p in picks)
        return {
            **({"none": [""] * len(exs)} if "" in prompts else {}),
            "best_prompt": [best] * len(exs),
            "best_prompt_dev": [best_dev] * len(exs),
            "random_prompt": [rng.choice(prompts) for _ in exs],
            "selector": picks,
        }

    def bounds(split: str) -> dict[str, list[bool]]:
        """The oracle and label-routing bounds on ``split``'s fully scored queries."""
        table, exs = outcomes[split], bounded[split]
        golds = [run.task.gold_text(e) for e in exs]
        grid = [[Score(correct=table[e.id][p]) for p in prompts] for e in exs]

        def routed(columns: list[int]) -> list[bool]:
            routing = label_routing(grid, golds, columns)
            return [table[e.id][prompts[routing[g]]] for e, g in zip(exs, golds, strict=True)]

        out = {"oracle": [any(table[e.id].values()) for e in exs], "label_routing": routed(list(range(len(prompts))))}
        # The same routes among the prompts that do not steer the target (the room left once steering is ruled out),
        # and among those that do not even lean it (the room for a gain that survives both checks).
        for name, flagged in (("label_routing_no_steering", steering), ("label_routing_no_leaning", leaning)):
            if (honest := [j for j, p in enumerate(prompts) if not flagged.get(p)]) and len(honest) < len(prompts):
                out[name] = routed(honest)
        return out

    def hits(split: str, sent: dict[str, list[str]]) -> dict[str, list[bool]]:
        """Each method's verdicts on ``split``, scoring the prompts it sent that are not scored yet."""
        exs = examples[split]
        wanted: dict[str, list[str]] = {}
        for picks in sent.values():
            for e, p in zip(exs, picks, strict=True):
                wanted.setdefault(e.id, []).append(p)
        score(split, wanted)
        return {m: [outcomes[split][e.id][p] for e, p in zip(exs, picks, strict=True)] for m, picks in sent.items()}

    # -- each recipe: loop 1 on the same D0 (resumes) ------------------------------------------------
    suffix = f"n{args.train_queries}x{args.prompts_per_query}"
    timings |= train_recipes(runs, recipes, suffix, lambda run_dir: reuse_d0(d0_dir, run_dir), seed=args.seed,
                             target=target, held_out=len(dev_ex))

    def qpo_picks(recipe: str, split: str, rules: tuple[str, ...] = RULES) -> tuple[dict[str, list[str]], float]:
        """The prompt the recipe's policy sends to each query of ``split``, per rule (a cache of every rule
        serves a subset; scoring fewer rules skips the passes only they need)."""
        run_dir, exs = recipe_dir(runs, recipe, suffix), examples[split]
        cache = every = run_dir / f"choices_{split}_{len(exs)}.json"
        if rules != RULES and not every.is_file():
            cache = run_dir / f"choices_{split}_{len(exs)}_{'+'.join(rules)}.json"
        choices = policy_choices(run_dir, [e.query for e in exs], prompts, cache,
                                 rules=rules, reference=reference_model(runs, recipe, suffix), seed=args.seed)
        policy_logps[f"{split}:{recipe}"] = choices.get("logps", {})
        sent = {}
        for rule in (r for r in rules_of(choices) if r in rules):
            picked[f"{split}:qpo_{recipe}_{rule}"] = Counter(source[prompts[c]] for c in choices[rule])
            sent[f"qpo_{recipe}_{rule}"] = [prompts[c] for c in choices[rule]]
        return sent, choices["seconds_per_query"]

    policy_logps: dict[str, dict[str, list[list[float]]]] = {}

    # -- validation chooses the recipe and the rule; test scores each listed recipe once ----------------
    sent = baselines("dev")
    seconds: dict[str, dict[str, float]] = {"dev": {}, "test": {}}
    gold = {split: [run.task.gold_text(e) for e in examples[split]] for split in examples}
    remaps: dict[str, dict[str, Any]] = {}  # label_route recipes: rule "remap", set from dev's route read
    tables: dict[str, RouteTable] = {}  # ... and rule "posterior", its temperature fit on dev's labels

    def route_sent(rule: str, recipe: str, split: str, likely: list[str]) -> list[str]:
        """What a route rule sends to ``split``'s queries, from the recipe's likelihood picks and policy scores."""
        if rule == "remap":
            out = [remaps[recipe]["serve"].get(p, p) for p in likely]
        else:
            out = posterior_picks(tables[recipe], policy_logps[f"{split}:{recipe}"]["top"], prompts)
        picked[f"{split}:qpo_{recipe}_{rule}"] = Counter(source[p] for p in out)
        return out

    for recipe in recipes:
        qpo, seconds["dev"][recipe] = qpo_picks(recipe, "dev")
        sent |= qpo
        if (likely := qpo.get(f"qpo_{recipe}_likelihood")) is not None and \
                (remap := remap_routes(recipe, d0, likely, gold["dev"])) is not None:
            remaps[recipe] = remap
            tables[recipe] = posterior_table(recipe, d0, policy_logps[f"dev:{recipe}"]["top"], prompts, gold["dev"])
            for rule in ROUTE_RULES:
                sent[f"qpo_{recipe}_{rule}"] = route_sent(rule, recipe, "dev", likely)
    dev, sent_dev = hits("dev", sent) | bounds("dev"), sent  # sent_dev: the route reads below need dev's picks
    dev_scores = {k: statistics.fmean(v) for k, v in dev.items()}
    qpo_dev = {k: v for k, v in dev_scores.items() if k.startswith("qpo_")}
    chosen = max(qpo_dev, key=qpo_dev.__getitem__) if qpo_dev else None  # no recipe: baselines and grids only
    chosen_recipe = next((r for r in recipes if chosen and chosen.removeprefix(f"qpo_{r}_") in RULES + ROUTE_RULES),
                         None)

    sent = baselines("test")
    test_recipes = [chosen_recipe if r == "chosen" else r for r in args.test_recipes.split(",")
                    if r and (r != "chosen" or chosen_recipe)]
    for recipe in dict.fromkeys(r for r in test_recipes if r in recipes):  # each with its best rule on dev
        rule = max((k for k in qpo_dev if k.removeprefix(f"qpo_{recipe}_") in RULES + ROUTE_RULES),
                   key=qpo_dev.__getitem__).removeprefix(f"qpo_{recipe}_")
        if rule in ROUTE_RULES:  # from the likelihood pass, with what dev set; only the rule's row is scored
            qpo, seconds["test"][recipe] = qpo_picks(recipe, "test", ("likelihood",))
            likely = qpo.pop(f"qpo_{recipe}_likelihood")
            del picked[f"test:qpo_{recipe}_likelihood"]
            qpo[f"qpo_{recipe}_{rule}"] = route_sent(rule, recipe, "test", likely)
        else:
            qpo, seconds["test"][recipe] = qpo_picks(recipe, "test", (rule,))
        sent |= qpo
    test = hits("test", sent) | bounds("test")
    steered = steering_check(sent, test, steering, "best_prompt_dev", test["best_prompt"]) if steering else {}
    leaned = steering_check(sent, test, leaning, "best_prompt_dev", test["best_prompt"]) if leaning else {}
    reference = {k: test[k] for k in REFERENCES}
    route_reads = {split: route_read(recipes, d0, table, gold[split]) for split, table in (("dev", sent_dev), ("test", sent))}
    # A bound on the first --bound-queries is compared on those queries (the split's prefix).
    methods = {k: method_row(v, {r: h[: len(v)] for r, h in reference.items() if r != k}) for k, v in test.items()}

    results: dict[str, Any] = {
        "benchmark": "pool_choice", "task": args.task, "target": target.id,
        "command": " ".join(["python", Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        **code,
        "environment": environment(),
        "settings": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, "train": TRAIN,
                     "recipes": {r: RECIPES[r] for r in recipes}},
        "d0": {"queries": summary.queries, "records": len(d0), "target_calls": summary.target_calls,
               "prompt_accuracy": {source[p]: accuracy[p] for p in prompts}, "best_prompt": source[best],
               "oracle": summary.oracle_accuracy},
        "best_prompt_dev": {"prompt": source[best_dev], "dev_accuracy": {source[p]: dev_accuracy[p] for p in prompts}},
        "pool": [{"source": src, "text": text} for src, text in pool],
        # Leakage check: a pick that names exactly one label word may answer instead of prompting.
        "pool_naming_one_label": [src for src, text in pool if names_one_label(text, run.task.labels)],
        # ... and one whose answers on dev are mostly one label steers the target there (tasks.steered_label).
        "pool_steering": {source[p]: label for p, label in steering.items() if label},
        # ... and those that lean it there (tasks.LEAN_REACH: 50% of the answers on 4 balanced labels).
        "pool_leaning": {source[p]: label for p, label in leaning.items() if label},
        "validation": {"queries": len(dev_ex), "scores": dev_scores, "chosen": chosen, "chosen_recipe": chosen_recipe},
        "prompts_sent": {k: dict(v.most_common()) for k, v in picked.items()},
        "test": {"queries": len(test_ex), "bound_queries": len(bounded["test"]), "methods": methods, "recipes_scored": list(dict.fromkeys(test_recipes)),
                 "steering": steered, "leaning": leaned},
        "policy_seconds_per_query": seconds,
        # label_route recipes: how often the policy sends the route of the query's gold label (how well it reads it)
        "route_reads": route_reads,
        # ... and what rule "remap" sent for each route at that read on dev (training.policy.route_remap)
        "route_remaps": {r: {"read": m["read"], "serve": {source[k]: source[v] for k, v in m["serve"].items()}}
                         for r, m in remaps.items()},
        # ... and the table rule "posterior" decides by (choice.RouteTable), its temperature fit on dev's labels
        "route_tables": {r: {**t.to_dict(), "routes": [source[p] for p in t.routes],
                             "prompts": [source[p] for p in t.prompts]} for r, t in tables.items()},
        # Each recipe's loops as run_loops recorded them (loop 2: the pairs it sampled, scored and kept).
        "recipe_loops": {r: [m.to_dict() for m in completed_loops(recipe_dir(runs, r, suffix))] for r in recipes},
        "timings": {**timings, "total_seconds": time.perf_counter() - started},
    }
    atomic_write_json(out / "results.json", results)
    (out / "report.md").write_text(report(results), encoding="utf-8")

    def bits(values: list[bool]) -> str:
        return "".join("1" if v else "0" for v in values)

    # Per query, for paired comparisons across runs and rules tried later without the models or the target.
    atomic_write_text(out / "per_query.json", json.dumps({
        "prompts": [source[p] for p in prompts], "d0": d0_verdicts(d0, {p: j for j, p in enumerate(prompts)}),
        "splits": {split: {
        "ids": [e.id for e in examples[split]], "gold": [run.task.gold_text(e) for e in examples[split]],
        "hits": {m: bits(h) for m, h in table.items()},
        "grid": {e.id: bits([outcomes[split][e.id][p] for p in prompts]) for e in bounded[split]},
        "policy_logps": {k.split(":", 1)[1]: v for k, v in policy_logps.items() if k.startswith(f"{split}:")},
    } for split, table in (("dev", dev), ("test", test))}}, ensure_ascii=False, separators=(",", ":")) + "\n")
    print((out / "report.md").read_text(encoding="utf-8"))


def recipe_route_lines(recipe: str) -> dict[str, bool]:
    """The lines a recipe's ``label_route`` training drew its routes with (label_routes' keyword arguments)."""
    train = RECIPES[recipe]["train"]
    return {"without_steering": bool(train.get("route_without_steering")),
            "without_leaning": bool(train.get("route_without_leaning")), "distinct": bool(train.get("route_distinct"))}


def recipe_routes(recipe: str, d0: list[Any], read: float | None = None) -> dict[str, str] | None:
    """A ``label_route`` recipe's routes as training drew them from D0 (``label -> prompt``), or with ``read`` the
    prompt each route sends at that route read (:func:`~qpo_middleware.training.policy.route_remap`); None for
    another recipe."""
    if RECIPES[recipe]["train"].get("conditioning") != "label_route":
        return None
    lines = recipe_route_lines(recipe)
    if read is not None:
        return route_remap(d0, read, **lines)
    return {label: prompt for (label, value), prompt in label_routes(d0, **lines).items() if value == 1.0}


def posterior_table(recipe: str, d0: list[Any], top: list[list[float]], prompts: list[str],
                    golds: list[str]) -> RouteTable:
    """Rule ``posterior`` for a ``label_route`` recipe: its :func:`~qpo_middleware.training.policy.route_table`, the
    temperature fit on dev's labels (no target call) from the policy's top-token scores of the routes (``top``:
    queries x ``prompts``)."""
    table = route_table(d0, **recipe_route_lines(recipe))
    scores = route_scores(table, top, prompts)
    rows = [i for i, g in enumerate(golds) if g in table.labels]
    return table.fit_temperature(scores[rows], [table.labels.index(golds[i]) for i in rows])


def remap_routes(recipe: str, d0: list[Any], picks: list[str], golds: list[str]) -> dict[str, Any] | None:
    """Rule ``remap`` for a ``label_route`` recipe: the share of dev queries its likelihood rule sends their gold
    label's route (``read``: dev's labels only, no target call) and what each route then sends (``serve``)."""
    if (routes := recipe_routes(recipe, d0)) is None:
        return None
    read = statistics.fmean(p == routes.get(g) for p, g in zip(picks, golds, strict=True))
    return {"read": read, "serve": recipe_routes(recipe, d0, read)}


def route_read(recipes: list[str], d0: list[Any], sent: dict[str, list[str]],
               golds: list[str]) -> dict[str, dict[str, Any]]:
    """Per ``label_route`` recipe and rule in ``sent``: the share of queries sent the route of their gold label (the
    routes as training drew them from D0, :func:`~qpo_middleware.training.policy.label_routes`), and the share sent
    any label's route. Only a policy that reads the label right can send its route; the gap to the label-routing
    bound is the label it misreads."""
    out: dict[str, dict[str, Any]] = {}
    for recipe in recipes:
        if (routes := recipe_routes(recipe, d0)) is None:
            continue
        for method, picks in sent.items():
            if method.startswith(f"qpo_{recipe}_") and method.removeprefix(f"qpo_{recipe}_") in RULES:
                pairs = list(zip(picks, golds, strict=True))
                out[method] = {
                    "gold_route": statistics.fmean(p == routes.get(g) for p, g in pairs),
                    "a_route": statistics.fmean(p in routes.values() for p, _ in pairs),
                    "queries": len(pairs)}
    return out


def route_lines(results: dict[str, Any]) -> list[str]:
    """How often each label_route policy sent the route of the query's gold label."""
    reads = results.get("route_reads") or {}
    rows = [(m, r, reads.get("test", {}).get(m)) for m, r in reads.get("dev", {}).items()]
    if not rows:
        return []
    def cell(read: dict[str, Any] | None) -> str:
        return "–" if read is None else f"{100 * read['gold_route']:.1f}% ({100 * read['a_route']:.1f}%)"

    remaps = [f"- `{recipe}`: at a route read of {100 * m['read']:.1f}% on dev, "
              + ("; ".join(f"`{route}` sends `{prompt}`" for route, prompt in m["serve"].items() if route != prompt)
                 or "every route sends its own prompt")
              for recipe, m in (results.get("route_remaps") or {}).items()]
    tables = [f"- `{recipe}`: temperature {t['temperature']:g}; routes " + ", ".join(f"`{r}`" for r in t["routes"])
              + f"; {len(t['prompts'])} prompts to send" for recipe, t in (results.get("route_tables") or {}).items()]
    return ["", "Route reads (label_route recipes: the share of queries sent their gold label's route, as training drew "
                "the routes from D0; in brackets, sent any label's route):", "",
            "| method | dev | test |", "|---|---:|---:|", *[f"| {m} | {cell(d)} | {cell(t)} |" for m, d, t in rows],
            *(["", "Rule `remap` (the likelihood pick, each route sending the prompt with the most expected right "
                   "answers on D0 at the policy's route read on dev):", "", *remaps] if remaps else []),
            *(["", "Rule `posterior` (per query, the prompt with the most expected right answers on D0 under the label "
                   "posterior the policy's route scores give; temperature fit on dev's labels):", "", *tables]
              if tables else [])]


def leakage_line(results: dict[str, Any]) -> str:
    """The leakage check: QPO picks among pool prompts, so only a pool prompt naming one label can leak."""
    leaky = results.get("pool_naming_one_label")
    if leaky is None:
        return "Leakage check: not recorded by this run."
    if not leaky:
        return "Leakage check: no pool prompt names exactly one label word, so no pick writes the answer into the prompt."
    return (f"Leakage check: {len(leaky)} pool prompt(s) name exactly one label word ("
            + ", ".join(f"`{p}`" for p in leaky) + "); the counts above show how often each method sent them.")


def steering_lines(results: dict[str, Any]) -> list[str]:
    """The behavioural leakage check: how often each method sent a prompt that steers the target to one label."""
    if "pool_steering" not in results:
        return ["Steering check: not recorded by this run."]
    pool = results["pool_steering"]
    lines = ["Steering check (a pool prompt whose answers on dev are mostly one label: it answers for the query, "
             "as a named label would): " + (", ".join(f"`{p}` → {label}" for p, label in pool.items()) if pool else
                                            "no pool prompt steers the target") + "."]
    rows = results["test"].get("steering", {})
    leaning, leaned = results.get("pool_leaning"), results["test"].get("leaning", {})
    if leaning is not None:  # runs before the lean check have neither
        softer = {p: label for p, label in leaning.items() if p not in pool}
        lines += ["", "Leaning prompts (a softer line: one label on at least a third of the way from its gold share to "
                      "every answer, 50% on 4 balanced labels; every steering prompt leans too): "
                  + (", ".join(f"`{p}` → {label}" for p, label in softer.items()) if softer else "none besides those")
                  + "."]
    if (pool or leaning) and rows:
        lean_head = " queries sent a leaning prompt | without leaning |" if leaned else ""
        lines += ["", "| method | queries sent a steering prompt | accuracy | with those sent `best_prompt_dev` "
                      f"| vs best prompt, without steering [95% CI] |{lean_head}",
                  "|---|---:|---:|---:|---|" + ("---:|---:|" if leaned else "")]
        for name, row in rows.items():
            gap = row["vs_reference_without_steering"]
            lean = (f" {100 * leaned[name]['steered_share']:.1f}% | {100 * leaned[name]['accuracy_without_steering']:.1f} |"
                    if leaned else "")
            lines.append(f"| {name} | {100 * row['steered_share']:.1f}% | "
                         f"{100 * results['test']['methods'][name]['accuracy']:.1f} | "
                         f"{100 * row['accuracy_without_steering']:.1f} | {100 * gap['diff']:+.1f} "
                         f"[{100 * gap['ci95'][0]:+.1f}, {100 * gap['ci95'][1]:+.1f}]"
                         f"{'' if gap['significant'] else ' (n.s.)'} |{lean}")
    return lines


def loop_lines(results: dict[str, Any]) -> list[str]:
    """What each later loop sampled on its new collect queries: pairs scored, their accuracy, preference pairs."""
    later = [(recipe, m) for recipe, loops in results.get("recipe_loops", {}).items() for m in loops if m["loop"] > 1]
    if not later:
        return []
    def accuracy(m: dict[str, Any]) -> str:
        return "–" if m.get("sampled_accuracy") is None else f"{100 * m['sampled_accuracy']:.1f}%"

    return ["", "Later loops (sampled on collect queries after the dev ones):", "",
            *[f"- {recipe} loop {m['loop']} ({m.get('sampling') or 'generate'}): {m['kept_pairs']} of "
              f"{m['sampled_pairs']} sampled pairs kept, the target right on {accuracy(m)} of them; "
              f"{m['preference_pairs']} preference pairs; {m['target_calls']} target calls; {m['seconds'] / 60:.0f} min"
              for recipe, m in later]]


def report(results: dict[str, Any]) -> str:
    s, d0, val, test = results["settings"], results["d0"], results["validation"], results["test"]
    bound = test.get("bound_queries", test["queries"])
    references = [r for r in REFERENCES if r in test["methods"]]
    grid = ("every test query" if bound == test["queries"] else
            f"the first {bound} test queries (the others on the prompts the methods sent)")
    lines = [
        f"# QPO recipes on {results['task']} with {results['target']}: choosing among the pool prompts", "",
        f"`{results['command']}` — commit `{results['commit']}`{' (uncommitted changes)' if results['dirty'] else ''}, "
        f"{results['environment'].get('cpu_model')}, {results['environment'].get('cpu_cores_usable')} cores", "",
        f"D0: {d0['queries']} train queries x {s['prompts_per_query'] or 'all'} of {len(results['pool'])} pool prompts "
        f"({d0['records']} records, D0 oracle {100 * d0['oracle']:.1f}%); dev: {val['queries']} collect queries; "
        f"test: {test['queries']} held-out queries; every pool prompt scored on every dev query and {grid}. "
        f"Best D0 prompt: `{d0['best_prompt']}` ({100 * d0['prompt_accuracy'][d0['best_prompt']]:.1f}% on D0)"
        + (f"; best on dev: `{results['best_prompt_dev']['prompt']}`."
           if "best_prompt_dev" in results else "."), "",
        "## Validation (chooses the recipe and how the policy picks)", "",
        "| method | dev accuracy |", "|---|---:|",
        *[f"| {k} | {100 * v:.1f} |" for k, v in sorted(val["scores"].items(), key=lambda kv: -kv[1])],
        "", f"Chosen: `{val['chosen']}`." if val["chosen"] else "No recipe trained: baselines and grids only.", "",
        "## Test (each recipe scored once)", "",
        "| method | accuracy % [95% CI] | " + " | ".join(f"vs {r.replace('_', ' ')} [95% CI]" for r in references) + " |",
        "|---|---|" + "---|" * len(references),
        *[method_line(k, row, references) for k, row in test["methods"].items()],
        "", "`oracle` and `label_routing` are bounds that read the gold label, not methods"
        + ("; `label_routing_no_steering` routes among the pool prompts that do not steer the target"
           if "label_routing_no_steering" in test["methods"] else "")
        + ("; `label_routing_no_leaning` among those that do not lean it either"
           if "label_routing_no_leaning" in test["methods"] else "")
        + (f" (on the first {test['bound_queries']} test queries, where every pool prompt was scored)."
           if bound < test["queries"] else "."), "",
        "Prompts sent on test (count per pool prompt):", "",
        *[f"- {k.removeprefix('test:')}: " + ", ".join(f"{a} {n}" for a, n in v.items())
          for k, v in results["prompts_sent"].items() if k.startswith("test:")],
        "", leakage_line(results), "", *steering_lines(results), *route_lines(results), *loop_lines(results),
        "", "Policy scoring cost per test query (every pool prompt, the passes its rule needs, CPU): " + ", ".join(
            f"{k} {v:.2f} s" for k, v in results["policy_seconds_per_query"]["test"].items()), "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
