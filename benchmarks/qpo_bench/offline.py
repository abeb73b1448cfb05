"""Offline QPO evaluation on known outcomes: the policy chooses among prompts whose result on each query is
already known (logged by someone else, or scored once on a local target), so recipes are compared with no
further target call. Shared by ``benchmarks/oirl.py`` (LLaMA-2-7B's logs) and ``benchmarks/pool_choice.py``
(a local target's full query x pool-prompt matrix).

* :data:`RECIPES` — the training recipes (loop 1 on D0, or later loops after another recipe), each a set of
  :class:`TrainConfig` and :class:`LoopConfig` fields over :data:`TRAIN`;
* :func:`train_recipes` — train each recipe in its own run directory (resumes);
* :func:`policy_choices` — which candidate the policy picks per query, by rule (cached);
* :func:`method_row` — accuracy with its interval and paired gaps to reference methods;
* :func:`gsm8k_logs` — Prompt-OIRL's GSM8K logs imported once under a runs folder, as outcome tables.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from qpo_middleware.choice import RouteTable, choose
from qpo_middleware.stats import bootstrap_ci, paired_bootstrap_ci
from qpo_middleware.training.config import RECIPES as PRESETS
from qpo_middleware.training.config import LoopConfig, TrainConfig
from qpo_middleware.training.dataset import OfflineDataset, Record
from qpo_middleware.training.export import read_choice_offsets
from qpo_middleware.training.io import atomic_write_json
from qpo_middleware.training.loops import completed_loops, final_checkpoint, load_policy, run_loops
from qpo_middleware.training.oirl import import_prompt_oirl
from qpo_middleware.training.run import RunPaths

logger = logging.getLogger(__name__)

# Training settings shared by every recipe (the quality benchmark's CPU profile); recipes differ in
# what the reward token encodes, which D0 records train, and the preference step.
TRAIN: dict[str, Any] = {"epochs": 2, "learning_rate": 2e-4, "batch_size": 8, "trainable": "top:4",
                         "prompt_max_tokens": 32, "query_max_tokens": 40, "device": "cpu"}
RECIPES: dict[str, dict[str, Any]] = {
    # The paper: absolute reward token, loop 1 on D0's better half ("expert" D0).
    "paper": {"train": dict(PRESETS["paper"].train), "loops": dict(PRESETS["paper"].loops)},
    # Query-relative token: the top bucket is this query's right prompt; every D0 record trains.
    "query_rank": {"train": {"conditioning": "query_rank"}, "loops": {"d0_floor_quantile": 0.0, "preference": "off"}},
    # The same, then DPO on (query, right prompt, wrong prompt) against the supervised policy: loop 1 with
    # --preference after. Run as query_rank's policy + a DPO step (--preference instead from that checkpoint,
    # reference = that policy), which is the same thing without training the supervised step twice.
    "query_rank_dpo": {"train": {"conditioning": "query_rank"}, "from": {"recipe": "query_rank"},
                       "loops": {"d0_floor_quantile": 0.0, "preference": "instead", "preference_epochs": 1,
                                 "preference_pairs_per_query": 2, "preference_learning_rate": 1e-4}},
    # query_rank with every weight trained, and the reward/separator token embeddings with it: the
    # conditioning then reaches the lower layers, which read the query.
    "query_rank_all": {"train": {"conditioning": "query_rank", "trainable": "all", "learning_rate": 5e-5},
                       "loops": {"d0_floor_quantile": 0.0, "preference": "off"}},
    # Query-relative token by label accuracy: the top bucket is, per query, the scored prompt that is right most
    # often on D0's queries of the same gold label; the policy learns to route by the label it reads (a linear
    # probe of SmolLM2's hidden states knows ag_news labels ~83% of the time; the target answers 63-69% right).
    "label_rank": {"train": {"conditioning": "label_rank"}, "loops": {"d0_floor_quantile": 0.0, "preference": "off"}},
    # DPO alone from the base model (no supervised step): the preference signal without imitation.
    # (`qpo train --recipe default`.)
    "dpo_only": {"train": dict(PRESETS["default"].train), "loops": dict(PRESETS["default"].loops)},
    # dpo_only with no pair whose chosen prompt steers the target to one label on D0 (those stay rejected ones): the
    # preference signal without being taught to prefer a prompt that answers for the query (route_without_steering's
    # analogue for the default recipe).
    "dpo_plain": {"train": {"conditioning": "query_rank"},
                  "loops": {"d0_floor_quantile": 0.0, "preference": "instead", "preference_epochs": 2,
                            "preference_pairs_per_query": 4, "preference_learning_rate": 1e-4,
                            "preference_without_steering": True}},
    # Loop 2 of dpo_only / dpo_plain (the issue's "loop T above loop 1"): the trained loop-1 policy draws 4 distinct
    # pool prompts per new query (held-out train-pool queries that are neither D0's, dev's nor test's) by its
    # 'choose' scores; the target scores them, and DPO trains again from loop 1's policy on D0's pairs and the new
    # ones. Its reference is loop 1's policy, and its offsets are taken under it.
    "dpo_only_loop2": {"train": {"conditioning": "query_rank"}, "after": {"recipe": "dpo_only", "queries": 500},
                       "loops": {"d0_floor_quantile": 0.0, "preference": "instead", "preference_epochs": 2,
                                 "preference_pairs_per_query": 4, "preference_learning_rate": 1e-4,
                                 "loops": 2, "samples_per_query": 4}},
    "dpo_plain_loop2": {"train": {"conditioning": "query_rank"}, "after": {"recipe": "dpo_plain", "queries": 500},
                        "loops": {"d0_floor_quantile": 0.0, "preference": "instead", "preference_epochs": 2,
                                  "preference_pairs_per_query": 4, "preference_learning_rate": 1e-4,
                                  "preference_without_steering": True, "loops": 2, "samples_per_query": 4}},
    # dpo_plain_loop2 with the draws spread (temperature 2 on the 'choose' scores): at 1, four prompts took 1,758 of
    # seed 2's 2,000 draws, nearly the policy's top 4 on every query.
    "dpo_plain_loop2_t2": {"train": {"conditioning": "query_rank"}, "after": {"recipe": "dpo_plain", "queries": 500},
                           "loops": {"d0_floor_quantile": 0.0, "preference": "instead", "preference_epochs": 2,
                                     "preference_pairs_per_query": 4, "preference_learning_rate": 1e-4,
                                     "preference_without_steering": True, "loops": 2, "samples_per_query": 4,
                                     "temperature": 2.0}},
    # dpo_only with label-smoothed pairs: a prompt's score on a query is half its verdict, half its accuracy on the
    # D0 queries of the same gold label, so pairs rank prompts by how well they suit the label (3 pairs per query
    # from any query instead of 4 from the mixed ones: on ag_news seed 0, 2,320 pairs against 2,004).
    "dpo_label": {"train": {"conditioning": "query_rank"},
                  "loops": {"d0_floor_quantile": 0.0, "preference": "instead", "preference_epochs": 2,
                            "preference_pairs_per_query": 3, "preference_learning_rate": 1e-4,
                            "preference_label_smoothing": 0.5}},
    # dpo_label with pairs ranked by label accuracy alone (w = 1): every pair says which prompt suits the query's
    # gold label better on D0, the routing the label routers measure, without the per-query verdict's noise.
    # 2 pairs per query: on ag_news seed 1, 1,905 pairs, about dpo_only's 2,016 (so about its training time).
    "dpo_by_label": {"train": {"conditioning": "query_rank"},
                     "loops": {"d0_floor_quantile": 0.0, "preference": "instead", "preference_epochs": 2,
                               "preference_pairs_per_query": 2, "preference_learning_rate": 1e-4,
                               "preference_label_smoothing": 1.0}},
    # Routes distilled into the policy: each query trains on its gold label's best prompt among the whole pool
    # (by D0's verdicts on the label's other queries) under the top token, and the label's worst under the bottom
    # one. label_rank's top token spread over the 5 prompts scored per query; this one names one prompt per label.
    # Every weight trained (the label is read below the top layers: the policy-base probe is best at layer 10-20).
    "label_route": {"train": {"conditioning": "label_route", "trainable": "all", "learning_rate": 5e-5},
                    "loops": {"d0_floor_quantile": 0.0, "preference": "off"}},
    # label_route with the routes chosen among the prompts that do not steer the target on D0 (on ag_news seed 0,
    # 12 of 19 pool prompts steer, and half of label_route's gain came from them): a routing gain that is not leaning.
    "label_route_plain": {"train": {"conditioning": "label_route", "trainable": "all", "learning_rate": 5e-5,
                                    "route_without_steering": True},
                          "loops": {"d0_floor_quantile": 0.0, "preference": "off"}},
    # label_route with the routes chosen among the prompts that do not even lean the target on D0 (the softer line):
    # on Qwen ag_news seed 1, label_route_plain sent 29% of its test queries a leaning prompt and was 67.3 without
    # them, 77.0 with them. A gain left here is a prompt suiting its label, not answering it more often.
    "label_route_no_lean": {"train": {"conditioning": "label_route", "trainable": "all", "learning_rate": 5e-5,
                                      "route_without_leaning": True},
                            "loops": {"d0_floor_quantile": 0.0, "preference": "off"}},
    # label_route_no_lean on 3,000 more labelled train queries (no target call; 1 epoch, so about 2x its training
    # time): on Qwen ag_news seed 1 the routes sent by gold topic score 82.7 on dev, but the policy read only 68.7%
    # of dev topics right (75.3% of test) and scored 68.0, the selector's. Does reading the label better carry it?
    "label_route_no_lean_q3000": {"train": {"conditioning": "label_route", "trainable": "all", "learning_rate": 5e-5,
                                            "route_without_leaning": True, "route_queries": 3000, "epochs": 1},
                                  "loops": {"d0_floor_quantile": 0.0, "preference": "off"}},
    # The same training compute as label_route_no_lean (2 x 2 examples per query of D0's 1,000), spent on twice
    # the distinct queries: 1,000 more labelled train queries, 1 epoch. Does reading more queries, not reading
    # them twice, carry the label better?
    "label_route_no_lean_q1000": {"train": {"conditioning": "label_route", "trainable": "all", "learning_rate": 5e-5,
                                            "route_without_leaning": True, "route_queries": 1000, "epochs": 1},
                                  "loops": {"d0_floor_quantile": 0.0, "preference": "off"}},
    # label_route_no_lean_q1000 with a different top route per label: on Qwen ag_news seed 2 two topics shared one
    # route (a 0.2-point tie on D0) and the policy sent it 69% of test queries, reading 70.0% of topics right
    # (seed 1, four routes: 84.0%). Do distinct routes read better?
    # (`qpo train --recipe route`.)
    "label_route_distinct_q1000": {"train": dict(PRESETS["route"].train), "loops": dict(PRESETS["route"].loops)},
    # The same on the top 4 layers only (the other recipes' setting): is the label read there?
    "label_route_top4": {"train": {"conditioning": "label_route"},
                         "loops": {"d0_floor_quantile": 0.0, "preference": "off"}},
}
# dpo_ratio: recipes with a preference step only; choose: checkpoints whose training recorded choice offsets
RULES = ("likelihood", "implicit", "dpo_ratio", "choose")
# Rules derived after the policy's passes: "remap" sends, for a label_route recipe, its likelihood pick through
# training.policy.route_remap at the route read the policy reached on dev (labels only; benchmarks/pool_choice.py);
# "posterior" sends per query the prompt with the most expected right answers under the label posterior of the
# policy's route scores (qpo_middleware.choice.RouteTable, its temperature fit on dev's labels)
ROUTE_RULES = ("remap", "posterior")


def recipe_dir(runs: Path, recipe: str, suffix: str) -> Path:
    return runs / f"{recipe}_{suffix}"


def train_recipes(runs: Path, recipes: Sequence[str], suffix: str, prepare: Callable[[Path], None], *,
                  seed: int, target: Any = None, held_out: int = 0,
                  say: Callable[[str], None] = print) -> dict[str, float]:
    """Train each recipe in ``runs/<recipe>_<suffix>`` (``prepare(dir)`` puts D0 there first): loop 1, or for a
    recipe ``after`` another, that recipe's finished run continued by its later loops. Those sample on collect
    queries after the first ``held_out`` (the benchmark validates on those, so no loop sees them). Finished ones
    are kept. Returns the seconds each newly trained recipe took."""
    timings: dict[str, float] = {}
    for recipe in recipes:
        run_dir = recipe_dir(runs, recipe, suffix)
        spec = RECIPES[recipe]
        loops = {"loops": 1, **spec["loops"]}
        if len(completed_loops(run_dir)) >= loops["loops"]:
            continue
        start: dict[str, Any] = {}
        if "from" in spec:  # starts from another recipe's trained policy (which must be listed first)
            source = recipe_dir(runs, spec["from"]["recipe"], suffix)
            if not completed_loops(source):
                raise SystemExit(f"Recipe {recipe} starts from {spec['from']['recipe']}: list it before {recipe}.")
            start = {"base_model": str(RunPaths(source).checkpoint(1))}
        if "after" in spec:  # continues another recipe's run (which must be listed first) with new collect queries
            source = recipe_dir(runs, spec["after"]["recipe"], suffix)
            if not completed_loops(source):
                raise SystemExit(f"Recipe {recipe} continues {spec['after']['recipe']}: list it before {recipe}.")
            continue_run(source, run_dir, held_out + spec["after"]["queries"])
            start = {"collect_skip": held_out}
        else:
            prepare(run_dir)
        say(f"training recipe {recipe} in {run_dir}")
        started = time.perf_counter()
        run_loops(run_dir, TrainConfig(**{**TRAIN, **spec["train"], "seed": seed}),
                  LoopConfig(seed=seed, eval_greedy=False, **start, **loops), target=target)
        timings[f"train_{recipe}"] = time.perf_counter() - started
    return timings


def continue_run(source: Path, run_dir: Path, collect_queries: int) -> None:
    """Start ``run_dir`` as a copy of ``source``'s finished run (D0, its loops, their checkpoints, the score cache;
    not the benchmark's choice caches) whose collect split holds ``collect_queries``: the same train split, the
    same first collect queries and more after them. Nothing happens when ``run_dir`` exists already."""
    if run_dir.exists():
        return
    staging = run_dir.with_name(run_dir.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(source, staging, ignore=shutil.ignore_patterns("choices_*.json"))
    paths = RunPaths(staging)
    config = json.loads(paths.run_file.read_text(encoding="utf-8"))
    if config["collect_queries"] > collect_queries:
        raise SystemExit(f"{source} collected {config['collect_queries']} queries; continuing it asks for more, "
                         f"not {collect_queries}.")
    atomic_write_json(paths.run_file, {**config, "collect_queries": collect_queries})
    staging.rename(run_dir)


def reference_model(runs: Path, recipe: str, suffix: str) -> str | None:
    """The policy a recipe's preference step started from (its DPO reference), or None without one."""
    spec = RECIPES[recipe]
    if spec["loops"].get("preference", "off") == "off":
        return None
    if spec["loops"]["preference"] != "instead":
        raise ValueError(f"Recipe {recipe}: only preference 'instead' keeps its reference (the start policy).")
    if "from" in spec:
        return str(RunPaths(recipe_dir(runs, spec["from"]["recipe"], suffix)).checkpoint(1))
    if "after" in spec:  # the last loop's preference step started from the loop before it
        loops = spec["loops"].get("loops", 1)
        return str(RunPaths(recipe_dir(runs, recipe, suffix)).checkpoint(loops - 1))
    return LoopConfig().base_model


def policy_choices(run_dir: Path, queries: list[str], prompts: list[str], cache: Path,
                   rules: tuple[str, ...] = ("likelihood", "implicit"), reference: str | None = None, *,
                   seed: int) -> dict[str, Any]:
    """Per rule, the index of the prompt the policy of the run's last loop picks for each query (cached in ``cache``):
    ``likelihood`` = most likely after the top reward token; ``implicit`` = most favoured by the top token
    over the bottom one; ``dpo_ratio`` = most favoured by the policy over ``reference`` (the model its
    preference step started from) after the top token, DPO's implicit reward; ``choose`` = the runtime's
    strategy 'choose', the top-token log-probability minus the offset training recorded for each prompt
    (``qpo_choice_offsets.json``; only when it covers every candidate). Each is scored only when asked
    for (``dpo_ratio`` only with a reference; ``choose`` is derived from ``top`` on every call, never
    cached). ``seconds_per_query`` is the policy's own scoring time; ``logps`` holds the (query x prompt)
    log-probabilities the rules read: ``top``, ``bottom``, ``reference``.

    ``seed`` is the one the recipe trained with: a base-model reference gets its reward-token rows from it,
    as in training. The cache serves only the same queries, prompts, reference and seed, with every rule asked."""
    from qpo_middleware.training.preference import candidate_logps

    def key(checkpoint: str) -> str:
        return hashlib.sha256(json.dumps([queries, prompts, reference, seed, checkpoint],
                                         ensure_ascii=False).encode("utf-8")).hexdigest()

    # The checkpoint by its place in the run, so the same run read through another path (a ``runs`` link) is
    # served; caches keyed on the path as given (before this key) are served too.
    checkpoint = final_checkpoint(run_dir)
    inputs, as_given = key(checkpoint.relative_to(run_dir).as_posix()), key(str(checkpoint))
    wanted = [r for r in rules if (r != "dpo_ratio" or reference is not None) and r != "choose"]
    if cache.is_file():
        cached = json.loads(cache.read_text(encoding="utf-8"))
        if cached.get("inputs") in (inputs, as_given) and all(r in cached for r in wanted):
            return with_choose(cached, run_dir, prompts) if "choose" in rules else cached
        logger.info("%s was made for other inputs or rules; scoring again", cache)
    # The policy format (buckets, token budgets) is the same in every recipe: TRAIN's.
    train = TrainConfig(**{**TRAIN, "seed": seed})
    model, tokenizer, fmt = load_policy(final_checkpoint(run_dir), train)
    top = len(fmt.reward_token_ids) - 1
    started = time.perf_counter()
    scores = candidate_logps(model, tokenizer, fmt, queries, prompts, (top, 0) if "implicit" in rules else (top,))
    seconds = time.perf_counter() - started
    choices: dict[str, Any] = {"inputs": inputs, "seconds_per_query": seconds / max(1, len(queries))}
    logps = {"top": scores[0], **({"bottom": scores[1]} if "implicit" in rules else {})}
    if "likelihood" in rules:
        choices["likelihood"] = scores[0].argmax(-1).tolist()
    if "implicit" in rules:
        choices["implicit"] = (scores[0] - scores[1]).argmax(-1).tolist()
    if "dpo_ratio" in rules and reference is not None:
        del model
        ref_model, ref_tokenizer, ref_fmt = load_policy(reference, train)
        ref = candidate_logps(ref_model, ref_tokenizer, ref_fmt, queries, prompts, (top,))
        choices["dpo_ratio"] = (scores[0] - ref[0]).argmax(-1).tolist()
        logps["reference"] = ref[0]
    # The scores themselves (query x prompt), so other rules can be tried later without the models.
    choices["logps"] = {k: [[round(x, 4) for x in row] for row in v.tolist()] for k, v in logps.items()}
    atomic_write_json(cache, choices)
    return with_choose(choices, run_dir, prompts) if "choose" in rules else choices


# The policy scores each rule reads from per_query.json's policy_logps (policy_choices' ``logps``): score = top - the other (or top alone).
RULE_SCORES = {"likelihood": None, "implicit": "bottom", "dpo_ratio": "reference"}


def rule_picks(rule: str, logps: dict[str, list[list[float]]]) -> list[int] | None:
    """The pool column a rule picks per query from the recorded policy scores, or None when the rule needs what
    was not recorded (``choose`` reads the checkpoint's offsets)."""
    if rule not in RULE_SCORES or "top" not in logps:
        return None
    top = np.asarray(logps["top"])
    other = RULE_SCORES[rule]
    if other is None:
        return top.argmax(-1).tolist()
    if other not in logps:
        return None
    return (top - np.asarray(logps[other])).argmax(-1).tolist()


def with_choose(choices: dict[str, Any], run_dir: Path, prompts: list[str]) -> dict[str, Any]:
    """``choices`` plus rule ``choose`` when the last loop's checkpoint holds choice offsets for every prompt."""
    recorded = read_choice_offsets(final_checkpoint(run_dir))
    if recorded is None or not all(p in recorded.offsets for p in prompts):
        logger.info("%s has no choice offsets for all %d candidates: no rule 'choose'", run_dir, len(prompts))
        return choices
    offsets = np.array([recorded.offsets[p] for p in prompts])
    return {**choices, "choose": [choose(np.array(row), offsets) for row in choices["logps"]["top"]]}


def rules_of(choices: dict[str, Any]) -> list[str]:
    """The rules a :func:`policy_choices` result holds."""
    return [rule for rule in RULES if rule in choices]


def open_pool_choice_run(result_dir: Path) -> tuple[dict[str, Any], dict[str, Any], Any, Any]:
    """A finished ``pool_choice.py`` result directory: ``(results, per_query, task, splits)``, the splits drawn again
    from ``$QPO_DATA`` and checked against the run's dev and test ids. Exits with the fix when it cannot."""
    from qpo_middleware.training.tasks import get_task

    try:
        results = json.loads((result_dir / "results.json").read_text(encoding="utf-8"))
        per_query = json.loads((result_dir / "per_query.json").read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        sys.exit(f"{exc.filename}: not found; pass a pool_choice.py result directory.")
    settings = results["settings"]
    task = get_task(settings["task"])
    splits = task.splits(seed=settings["seed"], n_train=settings["train_queries"],
                         n_collect=settings["dev_queries"], n_test=settings["test_queries"])
    dev, test = per_query["splits"]["dev"], per_query["splits"]["test"]
    if [e.id for e in splits.collect] != dev["ids"] or [e.id for e in splits.test] != test["ids"]:
        sys.exit(f"The {settings['task']} splits drawn from $QPO_DATA differ from the run's; "
                 "use the data the run was made with.")
    return results, per_query, task, splits


def d0_verdicts(records: Iterable[Record], column_of: Mapping[str, int]) -> dict[str, Any]:
    """D0's verdicts in ``per_query.json``'s compact form, so choice rules fit on D0 can be tried after the run's
    caches are gone: ``columns`` (the grid column of each D0 prompt, in first-seen order), ``ids`` (the D0
    queries, first-seen order), and per query ``scored`` (indices into ``columns``) and ``hits`` (``"1"`` = right).
    The query texts come from the task's train split. Read back with :func:`d0_table`."""
    prompts: dict[str, int] = {}
    rows: dict[str, list[tuple[int, bool]]] = {}
    for record in records:
        rows.setdefault(record.query_id, []).append((prompts.setdefault(record.prompt, len(prompts)), record.correct))
    return {"columns": [column_of[p] for p in prompts], "ids": list(rows),
            "scored": [[j for j, _ in row] for row in rows.values()],
            "hits": ["".join("1" if right else "0" for _, right in row) for row in rows.values()]}


def d0_table(d0: Mapping[str, Any]) -> tuple[list[str], list[int], np.ndarray, np.ndarray]:
    """``(query ids, grid columns, hits, counts)`` from :func:`d0_verdicts`' form: the matrices
    :func:`qpo_middleware.training.selector.outcome_table` makes from the records, in the same order."""
    hits = np.zeros((len(d0["ids"]), len(d0["columns"])))
    counts = np.zeros_like(hits)
    for q, (scored, bits) in enumerate(zip(d0["scored"], d0["hits"], strict=True)):
        for j, bit in zip(scored, bits, strict=True):
            counts[q, j] += 1.0
            hits[q, j] += float(bit == "1")
    return list(d0["ids"]), list(d0["columns"]), hits, counts


def method_row(hits: list[bool], reference: dict[str, list[bool]]) -> dict[str, Any]:
    """Accuracy, its 95% interval, and the paired bootstrap gap to each reference method."""
    low, high = bootstrap_ci(hits)
    row: dict[str, Any] = {"accuracy": statistics.fmean(hits), "ci95": [low, high], "n": len(hits)}
    for name, other in reference.items():
        diff, d_low, d_high, _ = paired_bootstrap_ci(hits, other)
        row[f"vs_{name}"] = {"diff": diff, "ci95": [d_low, d_high], "significant": d_low > 0 or d_high < 0}
    return row


def method_line(name: str, row: dict[str, Any], references: Sequence[str] = ("best_prompt", "selector")) -> str:
    """A report table row: accuracy with its interval, and the paired gaps to the reference methods."""
    cells = []
    for key in (f"vs_{r}" for r in references):
        gap = row.get(key)
        if gap is None:
            cells.append("—")
        else:
            mark = "" if gap["significant"] else " (n.s.)"
            cells.append(f"{100 * gap['diff']:+.1f} [{100 * gap['ci95'][0]:+.1f}, {100 * gap['ci95'][1]:+.1f}]{mark}")
    low, high = row["ci95"]
    return f"| {name} | {100 * row['accuracy']:.1f} [{100 * low:.1f}–{100 * high:.1f}] | " + " | ".join(cells) + " |"


def steering_check(sent: Mapping[str, Sequence[str]], hits: Mapping[str, Sequence[bool]],
                   steering: Mapping[str, str | None], fallback: str,
                   reference: Sequence[bool]) -> dict[str, dict[str, Any]]:
    """The behavioural leakage check of each method that sends prompts: ``steered_share``, the share of its
    queries sent a prompt that steers the target to one label (``steering``: prompt -> label or None, from
    :func:`qpo_middleware.training.tasks.steered_label` on dev), and ``accuracy_without_steering``, its accuracy
    when those queries get the verdict of ``fallback`` instead (a method's row, e.g. ``best_prompt_dev``), with
    the paired gap to ``reference`` (e.g. the best train prompt's verdicts). A gain that vanishes there came
    from routing each query to a prompt that answers its predicted label, not from a better instruction."""
    out: dict[str, dict[str, Any]] = {}
    for method, picks in sent.items():
        flags = [steering.get(p) is not None for p in picks]
        kept = [hits[fallback][i] if flag else hit for i, (hit, flag) in enumerate(zip(hits[method], flags, strict=True))]
        diff, low, high, _ = paired_bootstrap_ci(kept, list(reference[: len(kept)]))
        out[method] = {"steered_share": statistics.fmean(flags) if flags else 0.0,
                       "accuracy_without_steering": statistics.fmean(kept) if kept else None,
                       "vs_reference_without_steering": {"diff": diff, "ci95": [low, high],
                                                         "significant": low > 0 or high < 0}}
    return out


def logged(path: Path) -> dict[str, dict[str, bool]]:
    """query_id -> {prompt text -> correct} of an imported log dataset."""
    table: dict[str, dict[str, bool]] = {}
    for record in OfflineDataset(path):
        table.setdefault(record.query_id, {})[record.prompt] = record.correct
    return table


def gsm8k_logs(runs: Path) -> tuple[dict[str, dict[str, bool]], dict[str, dict[str, bool]], dict[str, str],
                                     dict[str, str]]:
    """``(train outcomes, test outcomes, query id -> text, prompt text -> alias)`` of LLaMA-2-7B-chat's GSM8K logs
    with the 6 training prompts (every train question; the first 1,000 test questions), imported from
    ``$QPO_DATA`` into ``runs/logs_train`` and ``runs/logs_test`` the first time."""
    dirs = {"train": runs / "logs_train", "test": runs / "logs_test"}
    for split, path in dirs.items():
        if not RunPaths(path).dataset.is_file():
            import_prompt_oirl(None, "gsm8k", path, split=split)
    outcomes: dict[str, dict[str, dict[str, bool]]] = {split: {} for split in dirs}
    texts: dict[str, str] = {}
    aliases: dict[str, str] = {}
    for split, path in dirs.items():  # one read of each log: outcomes, texts and aliases together
        for record in OfflineDataset(path):
            outcomes[split].setdefault(record.query_id, {})[record.prompt] = record.correct
            texts[record.query_id] = record.query
            aliases[record.prompt] = record.prompt_source.removeprefix("oirl:")
    return outcomes["train"], outcomes["test"], texts, aliases


def route_scores(table: RouteTable, top: Sequence[Sequence[float]], prompts: Sequence[str]) -> np.ndarray:
    """The policy's top-token scores of ``table``'s routes, in its order: the columns of ``top`` (queries x
    ``prompts``) that hold them."""
    return np.asarray(top)[:, [list(prompts).index(p) for p in table.routes]]


def posterior_picks(table: RouteTable, top: Sequence[Sequence[float]], prompts: Sequence[str]) -> list[str]:
    """The prompt rule ``posterior`` sends each query: the most expected right answers under the label posterior
    of ``table`` from the policy's top-token scores of the routes (``top``: queries x ``prompts``)."""
    return [table.prompts[i] for i in table.pick(route_scores(table, top, prompts))]
