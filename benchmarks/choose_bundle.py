"""The product path of a finished ``pool_choice.py`` run: its policy exported as a ``--strategy choose`` bundle and
served by the torch-free runtime, scored on the run's fully scored queries. No target call: every pool prompt's
verdict on those queries is in the run's ``per_query.json``.

``pool_choice.py`` measures choice rules inside the training code, with offsets (``choice_rules.py``) taken over
the dev queries. What ships differs in three ways, each measured here:

* the offsets are the ones training now writes (``training.loops.library_offsets``: the DPO reference's mean
  log-probability of each library prompt over ``--offset-queries`` training queries, the loop's seed);
* the scores come from the exported ONNX model in ``qpo_middleware.choice``, not from torch;
* the candidates are the bundle's library (D0's prompts, the blank one included).

Rows: the bundle on the dev split (all of it) and on the first N test queries (``--bound-queries`` of the run), beside
the run's own rows on the same queries (``dpo_ratio``, the fixed prompts, the selector), with paired 95% intervals;
how often the bundle agrees with the offline ``ratio_prior`` and ``dpo_ratio`` picks; and the runtime's latency per
query for ``choose`` and for greedy ``generate`` on the same bundle (load average recorded: it is only a CPU
figure when nothing else ran).

    python benchmarks/choose_bundle.py benchmarks/results/pool-choice-cpu/sst2-seed1-n1000x5-t600

Writes ``choose_bundle.json`` and ``choose_bundle.md`` (``choose_bundle-int8.*`` with ``--quantize int8``) next to
``per_query.json``; the bundle stays in the run
directory (ignored by git).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from qpo_bench.environment import code_version, environment
from qpo_bench.offline import TRAIN, method_line, method_row, posterior_picks, recipe_dir, reference_model
from qpo_middleware.stats import percentiles
from qpo_middleware.training.config import LoopConfig, TrainConfig
from qpo_middleware.training.dataset import OfflineDataset
from qpo_middleware.training.io import atomic_write_json, atomic_write_text
from qpo_middleware.training.run import Run, RunPaths

# The rows each method is compared with: fixed prompts, the selector and the run's own rules.
REFERENCES = ("best_prompt", "best_prompt_dev", "selector", "dpo_ratio", "likelihood", "posterior")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="A pool_choice results folder (results.json, per_query.json).")
    parser.add_argument("--recipe", default=None, help="Recipe whose policy is exported (default: the one dev chose).")
    parser.add_argument("--offset-queries", type=int, default=LoopConfig().choice_offset_queries)
    parser.add_argument("--latency-queries", type=int, default=50, help="Test queries timed per strategy.")
    parser.add_argument("--quantize", default=None, help="Export quantized (qpo export --quantize: int8, int4, ...); "
                        "results go to choose_bundle-<quantize>.json/.md.")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    code = code_version()
    results = json.loads((args.run / "results.json").read_text(encoding="utf-8"))
    data = json.loads((args.run / "per_query.json").read_text(encoding="utf-8"))
    settings = results["settings"]
    recipe = args.recipe or results["validation"]["chosen_recipe"]
    name = f"{settings['task']}-seed{settings['seed']}-n{settings['train_queries']}x{settings['prompts_per_query']}"
    runs = Path(settings["out"]) / "runs" / name
    suffix = f"n{settings['train_queries']}x{settings['prompts_per_query']}"
    run_dir = recipe_dir(runs, recipe, suffix)
    checkpoint = RunPaths(run_dir).checkpoint(1)
    if not checkpoint.is_dir():
        sys.exit(f"{checkpoint} is missing: the run directory of {args.run} is not on this machine (run directories "
                 "are not committed); re-run benchmarks/pool_choice.py with the same arguments first.")

    # -- the offsets training writes now (the run predates them): the reference over training queries ----------
    from qpo_middleware.training.export import (
        export_bundle,
        read_choice_offsets,
        read_route_table,
        write_choice_offsets,
    )
    from qpo_middleware.training.loops import library_offsets, load_policy

    seed = settings["seed"]
    timings: dict[str, float] = {}
    # A label_route policy's bundle sends by the route table training wrote: no offsets.
    table = read_route_table(checkpoint)
    recorded = read_choice_offsets(checkpoint) if table is None else None
    if table is None and (recorded is None or recorded.queries != min(
            args.offset_queries, len({r.query_id for r in OfflineDataset(run_dir).records}))):
        reference = reference_model(runs, recipe, suffix)
        if reference is None:
            sys.exit(f"Recipe {recipe!r} has no preference step, so no reference to take offsets from.")
        started = time.perf_counter()
        model, tokenizer, fmt = load_policy(reference, TrainConfig(**{**TRAIN, "seed": seed}))
        # As run_loops does for loop 1: LoopConfig(seed=seed) draws the queries with seed + loop.
        recorded = library_offsets(model, tokenizer, fmt, OfflineDataset(run_dir).records, 1, args.offset_queries,
                                   seed=seed + 1)
        write_choice_offsets(checkpoint, recorded)
        timings["offsets"] = time.perf_counter() - started
        del model

    dtype = args.quantize or "fp32"
    bundle_dir = run_dir / f"bundle_choose_{dtype}"
    started = time.perf_counter()
    export_bundle(checkpoint, bundle_dir, generation={"strategy": "choose"}, quantize=args.quantize, overwrite=True)
    timings["export"] = time.perf_counter() - started

    # -- the run's queries (the same splits pool_choice drew) ------------------------------------------------------
    d0 = Run.open(runs / "d0")
    splits = d0.task.splits(d0.config.data_dir, **(d0.config.split_args() | {"n_test": settings["test_queries"]}))
    examples = {"dev": list(d0.splits.collect), "test": list(splits.test)}
    pool = dict(d0.prompts())  # source id -> text
    ids = data["prompts"]  # the grid's columns: source ids
    column = {pool[src]: i for i, src in enumerate(ids)}

    from qpo_middleware import PromptOptimizer

    optimizer = PromptOptimizer.from_bundle(bundle_dir, provider="cpu")
    library = {e.text for e in optimizer._choices}
    if missing := [src for src in ids if pool[src] not in library]:
        sys.exit(f"The bundle's library lacks pool prompt(s) {missing}: it must hold D0's prompts.")

    out_rows: dict[str, Any] = {}
    agreement: dict[str, Any] = {}
    sent: dict[str, Any] = {}
    for split in ("dev", "test"):
        part = data["splits"][split]
        n = len(part["grid"])
        exs = examples[split][:n]
        if [e.id for e in exs] != part["ids"][:n]:
            sys.exit(f"The {split} split drawn here differs from {args.run}'s; same data and code version needed.")
        started = time.perf_counter()
        prompts = [r.prompt for r in optimizer.optimize_batch([e.query for e in exs])]
        timings[f"choose_{split}"] = time.perf_counter() - started
        picks = [column[p] for p in prompts]
        grid = [part["grid"][e.id] for e in exs]
        verdicts = [row[c] == "1" for row, c in zip(grid, picks, strict=True)]
        head = {k: [c == "1" for c in v[:n]] for k, v in part["hits"].items()}
        own = [f"qpo_{recipe}_{rule}" for rule in (("likelihood", "posterior") if table else ("dpo_ratio",))]
        rows = {"bundle (choose)": verdicts, **{k.removeprefix(f"qpo_{recipe}_"): head[k] for k in own if k in head},
                **{k: head[k] for k in ("best_prompt", "best_prompt_dev", "selector") if k in head}}
        references = {k: rows[k] for k in REFERENCES if k in rows}
        out_rows[split] = {"queries": n, "methods": {k: method_row(v, {r: h for r, h in references.items() if r != k})
                                                     for k, v in rows.items()}}
        logps = part["policy_logps"][recipe]
        if table is not None:  # the same rules from torch's scores of the pool prompts
            texts = [pool[src] for src in ids]
            offline = {
                "likelihood (torch)": [max(range(len(r)), key=r.__getitem__) for r in logps["top"][:n]],
                "posterior (torch, the checkpoint's table)": [column[p] for p in posterior_picks(
                    table, logps["top"][:n], texts)],
            }
        else:
            dev_logps = data["splits"]["dev"]["policy_logps"][recipe]
            offsets = [statistics.fmean(col) for col in zip(*dev_logps["reference"], strict=True)]
            offline = {
                "ratio_prior (dev offsets, torch)": [max(range(len(r)), key=lambda j, r=r: r[j] - offsets[j])
                                                     for r in logps["top"][:n]],
                "dpo_ratio (torch)": [max(range(len(t)), key=lambda j, t=t, f=f: t[j] - f[j])
                                      for t, f in zip(logps["top"][:n], logps["reference"][:n], strict=True)],
            }
        agreement[split] = {k: statistics.fmean(a == b for a, b in zip(v, picks, strict=True)) for k, v in offline.items()}
        sent[split] = {ids[c]: picks.count(c) for c in sorted(set(picks), key=lambda c: -picks.count(c))}

    # -- latency per query: choose vs greedy generate, one query per call --------------------------------------------
    timed = [e.query for e in examples["test"][: args.latency_queries]]
    latency: dict[str, Any] = {"load_average_before": os.getloadavg()}
    for strategy in ("choose", "generate"):
        optimizer.optimize(timed[0], strategy=strategy)  # warm-up
        per = []
        for query in timed:
            t = time.perf_counter()
            optimizer.optimize(query, strategy=strategy)
            per.append(1000 * (time.perf_counter() - t))
        summary = percentiles(per)
        latency[strategy] = {"p50_ms": summary["p50"], "p95_ms": summary["p95"], "mean_ms": summary["mean"],
                             "queries": summary["n"]}
    latency["load_average_after"] = os.getloadavg()
    latency["library_prompts"] = len(optimizer._choices)

    out = {"benchmark": "choose_bundle", "run": args.run.as_posix(), "recipe": recipe, "checkpoint": str(checkpoint),
           "command": " ".join(["python", Path(sys.argv[0]).as_posix(), *sys.argv[1:]]), **code,
           "environment": environment(), "dtype": dtype,
           "offsets": None if recorded is None else {"queries": recorded.queries, "seed": seed + 1,
                                                     "prompts": len(recorded.offsets)},
           "route_table": None if table is None else table.to_dict(),
           "splits": out_rows, "agreement": agreement, "prompts_sent": sent, "latency": latency, "timings": timings}
    stem = "choose_bundle" + (f"-{args.quantize}" if args.quantize else "")
    atomic_write_json(args.run / f"{stem}.json", out)
    lines = [f"# The exported `--strategy choose` bundle: {results['task']} seed {seed}, recipe {recipe}", "",
             f"`{out['command']}` — commit `{out['commit']}`; run `{results['commit']}`; "
             + (f"offsets from {recorded.queries} training queries (the reference, seed {seed + 1})" if table is None
                else f"the checkpoint's route table ({len(table.routes)} routes, {len(table.prompts)} prompts to "
                     f"send, temperature {table.temperature:g})")
             + f"; ONNX {dtype} on CPU.", ""]
    for split, part in out_rows.items():
        refs = [r for r in REFERENCES if r in part["methods"]]
        lines += [f"## {split}: {part['queries']} queries (every pool prompt scored)", "",
                  "| method | accuracy % [95% CI] | " + " | ".join(f"vs {r.replace('_', ' ')}" for r in refs) + " |",
                  "|---|---|" + "---|" * len(refs),
                  *[method_line(k, row, refs) for k, row in part["methods"].items()], "",
                  "Agreement with the offline picks: " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in
                                                                   agreement[split].items()) + ".",
                  "Prompts sent: " + ", ".join(f"{k} {v}" for k, v in sent[split].items()) + ".", ""]
    lines += ["## Latency per query (one query per call, CPU)", "",
              "| strategy | p50 ms | p95 ms | mean ms |", "|---|---:|---:|---:|",
              *[f"| {s} | {latency[s]['p50_ms']:.0f} | {latency[s]['p95_ms']:.0f} | {latency[s]['mean_ms']:.0f} |"
                for s in ("choose", "generate")], "",
              f"{latency['library_prompts']} library prompts; load average before/after "
              f"{latency['load_average_before'][0]:.1f}/{latency['load_average_after'][0]:.1f} "
              f"({os.cpu_count()} cores).", ""]
    atomic_write_text(args.run / f"{stem}.md", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
