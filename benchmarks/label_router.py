"""How well must a router know the label? Label routing measured on a finished ``pool_choice.py`` run.

On a weak target most of the pool oracle is routing by label: each gold label has a pool prompt that is right
on that label's queries more often than the best single prompt. A QPO policy can only route that way if it
knows the label better than the target does. This reads a run's ``per_query.json`` (the full pool grid on
every dev query and the first ``--bound-queries`` test queries) and the task's data, and measures:

* ``routes``: per gold label, the pool prompt right most often on that label's **dev** queries (the
  collect split, a validation split);
* ``classifier``: a softmax regression fit on the run's train queries and their gold labels (no target call),
  on the selector's hashed query features (:func:`qpo_middleware.training.selector.text_features`;
  ``--features hashed``, the default) or on the policy base's own hidden states (``--features policy``: the
  mask-averaged hidden state of one layer of the untrained policy base, standardised on train; a linear probe
  of what the policy could know about the label before any QPO training). L2 (and the layer) chosen by dev
  accuracy;
* ``label_router``: each test query sent to the route of the label the classifier predicts — a method
  (it reads train and dev labels only);
* ``gold_routes``: the same routes with the gold label — a bound, not a method;
* ``noisy_routes@q``: the expected accuracy of the routes when the label is right with probability ``q`` and
  otherwise one of the other labels at random: the accuracy a policy that knows the label ``q`` of the time
  could reach by routing.

Test rows are on the fully scored test queries only, with paired intervals against the best train prompt and
the selector sent to the same queries. Writes ``label_router.json`` and ``label_router.md`` next to
``per_query.json`` (``label_router_policy.*`` with ``--features policy``).

    python benchmarks/label_router.py benchmarks/results/pool-choice-cpu/ag_news-seed0-n1000x5-t600
    python benchmarks/label_router.py benchmarks/results/pool-choice-cpu/ag_news-seed0-n1000x5-t600 --features policy
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

import numpy as np

from qpo_bench.environment import code_version
from qpo_bench.features import policy_feature_sets
from qpo_bench.harness import label_routing
from qpo_bench.offline import method_line, method_row, open_pool_choice_run
from qpo_middleware.training.io import atomic_write_json, atomic_write_text
from qpo_middleware.training.selector import text_features
from qpo_middleware.training.targets import Score

FEATURE_DIM = 4096
L2_GRID = (1e-4, 1e-3, 1e-2)
POLICY_L2_GRID = (1e-2, 1e-1, 1.0)  # standardised hidden states: a stronger prior than the sparse hashed features
NOISE_LEVELS = (0.7, 0.8, 0.9, 0.95, 1.0)
REFERENCES = ("best_prompt", "selector")
VERBS = {"steering": "steer", "leaning": "lean"}  # --without-<check>: what a flagged prompt does to the target


def fit_softmax(x: np.ndarray, y: np.ndarray, n_classes: int, l2: float, steps: int = 300,
                learning_rate: float = 0.05) -> np.ndarray:
    """Multinomial logistic regression (weights with a bias column) by full-batch Adam; deterministic."""
    x1 = np.hstack([x, np.ones((len(x), 1))])
    weights = np.zeros((x1.shape[1], n_classes))
    onehot = np.eye(n_classes)[y]
    m, v = np.zeros_like(weights), np.zeros_like(weights)
    for step in range(1, steps + 1):
        logits = x1 @ weights
        prob = np.exp(logits - logits.max(1, keepdims=True))
        prob /= prob.sum(1, keepdims=True)
        grad = x1.T @ (prob - onehot) / len(x1) + l2 * weights
        m = 0.9 * m + 0.1 * grad
        v = 0.999 * v + 0.001 * grad * grad
        weights -= learning_rate * (m / (1 - 0.9**step)) / (np.sqrt(v / (1 - 0.999**step)) + 1e-8)
    return weights


def predict(weights: np.ndarray, x: np.ndarray) -> np.ndarray:
    return (np.hstack([x, np.ones((len(x), 1))]) @ weights).argmax(1)


def feature_sets(kind: str, train: list[str], dev: list[str], test: list[str],
                 base: str | None = None) -> dict[str, tuple[np.ndarray, ...]]:
    """Candidate (train, dev, test) feature matrices by name; the classifier picks one (and its L2) on dev."""
    if kind == "hashed":
        return {"hashed": tuple(text_features(texts, FEATURE_DIM) for texts in (train, dev, test))}
    return policy_feature_sets(train, dev, test, base=base)


def routes_from(grid: list[str], golds: list[str], labels: list[str], columns: list[int] | None = None) -> dict[str, int]:
    """Per label, the grid column (``"1"`` = right) right most often on that label's rows, among ``columns`` (default
    all); every label needs rows."""
    if missing := [label for label in labels if label not in golds]:
        sys.exit(f"No dev query has the label(s) {missing}: routes need each label on dev; use more --dev-queries.")
    matrix = [[Score(correct=hit == "1") for hit in row] for row in grid]
    return label_routing(matrix, golds, list(range(len(grid[0]))) if columns is None else columns)


def noisy_accuracy(grid: list[str], golds: list[str], routes: dict[str, int], labels: list[str], q: float) -> float:
    """Expected accuracy of ``routes`` when the label is right with probability ``q``, else uniform over the rest."""
    others = len(labels) - 1
    total = 0.0
    for row, gold in zip(grid, golds, strict=True):
        right = row[routes[gold]] == "1"
        wrong = sum(row[routes[label]] == "1" for label in labels if label != gold)
        total += q * right + (1 - q) * wrong / others
    return total / len(grid)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("result_dir", type=Path, help="A pool_choice.py result directory (with per_query.json).")
    parser.add_argument("--features", choices=("hashed", "policy"), default="hashed",
                        help="The classifier's query features: hashed text features, or the untrained policy "
                             "base's hidden states (a linear probe; loads the base model).")
    parser.add_argument("--extra-train", type=int, default=0,
                        help="Fit the classifier on this many more labelled train-pool queries, beyond the run's D0 "
                             "queries and disjoint from every split (their labels only: no target call). Asks "
                             "whether more labelled queries, which cost nothing to label-route, read the label better.")
    parser.add_argument("--base", default=None,
                        help="With --features policy: the local base model read (default: the default policy base; "
                             "e.g. qwen2.5-coder-0.5b-instruct to ask whether a bigger base would read the label).")
    parser.add_argument("--without-steering", action="store_true",
                        help="Route only among the pool prompts that do not steer the target to one label on dev "
                             "(the run's pool_steering): is there a routing gain that is not leaning the target?")
    parser.add_argument("--without-leaning", action="store_true",
                        help="Route only among the pool prompts that do not even lean the target to one label on dev "
                             "(the run's pool_leaning, the softer line; every steering prompt leans): the room for a "
                             "gain that survives both checks.")
    args = parser.parse_args()
    if args.without_steering and args.without_leaning:
        sys.exit("--without-leaning already leaves out every steering prompt: give one of the two.")
    without = "leaning" if args.without_leaning else "steering" if args.without_steering else None
    code = code_version()
    results, per_query, task, splits = open_pool_choice_run(args.result_dir)
    settings = results["settings"]
    if not task.labels:
        sys.exit(f"Task {settings['task']!r} has no label words: label routing needs a classification task.")
    labels = list(task.labels)
    dev, test = per_query["splits"]["dev"], per_query["splits"]["test"]
    prompts = per_query["prompts"]

    # -- the classifier: train queries and their gold labels, L2 chosen on dev ---------------------------------
    train = list(splits.train)
    if args.extra_train:
        if args.extra_train < 0:
            sys.exit("--extra-train must be 0 or more.")
        from qpo_middleware.training.tasks import TaskError

        try:
            train += task.splits(seed=settings["seed"], n_train=settings["train_queries"],
                                 n_collect=settings["dev_queries"], n_test=settings["test_queries"],
                                 n_dev=args.extra_train).dev
        except TaskError as exc:
            sys.exit(f"--extra-train {args.extra_train}: {exc}")
    y_train = np.array([labels.index(task.gold_text(e)) for e in train])
    by_id = {e.id: e for e in [*splits.collect, *splits.test]}
    dev_gold = list(dev["gold"])
    bound_ids = [qid for qid in test["ids"] if qid in test["grid"]]
    test_gold = [g for qid, g in zip(test["ids"], test["gold"], strict=True) if qid in test["grid"]]
    sets = feature_sets(args.features, [e.query for e in train], [by_id[q].query for q in dev["ids"]],
                        [by_id[q].query for q in bound_ids], base=args.base)
    grid = L2_GRID if args.features == "hashed" else POLICY_L2_GRID
    fitted, scores = {}, {}
    for name, (x_train, x_dev, _) in sets.items():
        for l2 in grid:
            fitted[(name, l2)] = fit_softmax(x_train, y_train, len(labels), l2)
            predicted = predict(fitted[(name, l2)], x_dev)
            scores[(name, l2)] = statistics.fmean(labels[p] == g for p, g in zip(predicted, dev_gold, strict=True))
    chosen = max(scores, key=scores.__getitem__)  # ties: the first (fewer layers, weaker L2) wins
    dev_scores = {f"{name}, l2 {l2:g}": score for (name, l2), score in scores.items()}
    features, l2 = chosen
    weights = fitted[chosen]
    _, x_dev, x_test = sets[features]
    predicted_dev = [labels[p] for p in predict(weights, x_dev)]
    predicted_test = [labels[p] for p in predict(weights, x_test)]

    # -- routes chosen on dev, sent on the fully scored test queries --------------------------------------------
    dev_grid = [dev["grid"][q] for q in dev["ids"]]
    test_grid = [test["grid"][q] for q in bound_ids]
    flagged: dict[str, str] = {}
    if without:
        if f"pool_{without}" not in results:
            sys.exit(f"{args.result_dir} has no pool_{without} (made before the {without} check): rerun pool_choice.py.")
        flagged = results[f"pool_{without}"]
    columns = [j for j, prompt in enumerate(prompts) if prompt not in flagged]
    if not columns:
        sys.exit(f"Every pool prompt {VERBS[without or 'steering']}s the target on dev: nothing to route among "
                 f"without {without}.")
    routes = routes_from(dev_grid, dev_gold, labels, columns)
    position = {qid: i for i, qid in enumerate(test["ids"])}
    hits = {name: [test["hits"][name][position[q]] == "1" for q in bound_ids] for name in REFERENCES}
    hits["label_router"] = [row[routes[p]] == "1" for row, p in zip(test_grid, predicted_test, strict=True)]
    hits["gold_routes"] = [row[routes[g]] == "1" for row, g in zip(test_grid, test_gold, strict=True)]
    rows = {name: method_row(h, {r: hits[r] for r in REFERENCES if r != name}) for name, h in hits.items()}
    noisy = {str(q): {"dev": noisy_accuracy(dev_grid, dev_gold, routes, labels, q),
                      "test": noisy_accuracy(test_grid, test_gold, routes, labels, q)} for q in NOISE_LEVELS}
    out = {
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        **code,
        "run": {"command": results["command"], "commit": results["commit"]},
        "task": settings["task"], "seed": settings["seed"], "train_queries": len(train),
        "dev_queries": len(dev_gold), "test_queries": len(bound_ids),
        "classifier": {"kind": args.features,
                       "features": f"text_features(dim={FEATURE_DIM})" if args.features == "hashed" else
                       f"policy base hidden states, {features}" + (f" of {args.base}" if args.base else ""),
                       "dev_accuracy_by_setting": dev_scores, "l2": l2,
                       "dev_accuracy": statistics.fmean(p == g for p, g in zip(predicted_dev, dev_gold, strict=True)),
                       "test_accuracy": statistics.fmean(p == g for p, g in zip(predicted_test, test_gold, strict=True))},
        "routes": {label: prompts[j] for label, j in routes.items()},
        "without_steering": without is not None, "without": without, "route_columns": len(columns),
        "dev": {"label_router": statistics.fmean(row[routes[p]] == "1" for row, p in zip(dev_grid, predicted_dev, strict=True)),
                "gold_routes": noisy["1.0"]["dev"],
                "best_prompt_dev": max(statistics.fmean(row[j] == "1" for row in dev_grid) for j in range(len(prompts)))},
        "noisy_routes": noisy,
        "test": rows,
    }
    stem = ("label_router" if args.features == "hashed" else "label_router_policy" + (f"_{args.base}" if args.base else "")) \
        + (f"_extra{args.extra_train}" if args.extra_train else "") + (f"_no_{without}" if without else "")
    atomic_write_json(args.result_dir / f"{stem}.json", out)
    atomic_write_text(args.result_dir / f"{stem}.md", report(out))
    print(report(out))


def report(out: dict[str, Any]) -> str:
    c = out["classifier"]
    lines = [
        f"# Label routing on {out['task']} (seed {out['seed']}): how well must a router know the label?", "",
        f"`{out['command']}` — commit `{out['commit']}`; from the run `{out['run']['command']}` (commit `{out['run']['commit']}`)", "",
        f"Routes (per gold label, the pool prompt right most often on its {out['dev_queries']} dev queries"
        + (f", among the {out['route_columns']} that do not {VERBS[out['without']]} the target on dev"
           if out["without"] else "")
        + "): "
        + ", ".join(f"{label} → `{prompt}`" for label, prompt in out["routes"].items()) + ".", "",
        f"Classifier: softmax regression on {'hashed query features' if c['kind'] == 'hashed' else c['features']}, "
        f"fit on the {out['train_queries']} train queries' "
        f"gold labels (L2 {c['l2']:g}, chosen on dev): {100 * c['dev_accuracy']:.1f}% on dev, "
        f"{100 * c['test_accuracy']:.1f}% on the {out['test_queries']} test queries.", "",
        f"Dev: best single prompt {100 * out['dev']['best_prompt_dev']:.1f}, label router "
        f"{100 * out['dev']['label_router']:.1f}, gold routes {100 * out['dev']['gold_routes']:.1f} (in-sample).", "",
        f"## Test (the {out['test_queries']} fully scored test queries)", "",
        "| method | accuracy % [95% CI] | vs best prompt [95% CI] | vs selector [95% CI] |", "|---|---|---|---|",
    ]
    names = {"label_router": "label router (classifier → route; a method)", "gold_routes": "gold label → route (a bound)"}
    lines += [method_line(names.get(name, name), row, REFERENCES) for name, row in out["test"].items()]
    lines += ["", "## Routes when the label is known with probability q (expected accuracy)", "",
              "| q | dev | test |", "|---:|---:|---:|"]
    lines += [f"| {q} | {100 * v['dev']:.1f} | {100 * v['test']:.1f} |" for q, v in out["noisy_routes"].items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
