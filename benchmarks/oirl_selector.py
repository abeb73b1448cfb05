"""Is there a per-question signal in LLaMA-2-7B-chat's GSM8K logs? Per-question prompt choice as the logs grow.

``benchmarks/oirl.py`` trains QPO on 300 of the 7,473 logged train questions and ties the best training prompt; so
does the selector fit on the same 300. The question this answers before more QPO training is spent: does choosing
a prompt per question beat one prompt for all when the choice is learned from *all* the logs? For each train size
(``--train-sizes``; ``all`` = every logged train question outside dev) it fits, on the first N questions of one
seeded shuffle:

* ``best_prompt`` — the prompt with the best accuracy on those N questions, for every question;
* ``selector`` — the Prompt-OIRL-style model (:func:`qpo_middleware.training.selector.fit_outcome_model`) on hashed
  words and character n-grams, its L2 chosen by cross-validation on the N questions (the library's selector);
* ``head`` — the same model on the policy base's mask-averaged hidden states (:mod:`qpo_bench.features`; the
  features Prompt-OIRL's reward model reads are LLM embeddings), its layer and L2 chosen on the dev questions;
* ``oracle`` — a question counts when any of the 6 prompts was right: an upper bound, not a method.

Dev is ``--dev-queries`` logged train questions held out of every size; test is the first ``--test-queries`` of
the 1,000 logged test questions, scored once per size with the dev-chosen setting, with paired 95% intervals
against ``best_prompt`` and ``selector``. No target is called and no policy is trained: this runs on CPU in
minutes (the features are read once and cached under ``OUT/runs/``).

    python benchmarks/oirl_selector.py --train-sizes 300,1000,3000,all --out benchmarks/results/oirl-selector

Writes ``OUT/results.json`` (command, commit, hardware, settings, per size the dev scores that chose and the test
rows), ``OUT/report.md`` and ``OUT/oirl_selector.png`` (test accuracy per method against train size).
"""

from __future__ import annotations

import argparse
import logging
import random
import statistics
import sys
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from qpo_bench.environment import code_version, environment
from qpo_bench.features import POLICY_LAYER_FRACTIONS, policy_feature_sets
from qpo_bench.offline import gsm8k_logs, method_line, method_row
from qpo_middleware.training.io import atomic_write_json, atomic_write_text
from qpo_middleware.training.oirl import BASE_ALIASES
from qpo_middleware.training.selector import SelectorConfig, fit_outcome_model, outcome_logits, text_features

# Standardised dense hidden states need a stronger prior than the sparse hashed features' (as in choice_head.py).
HEAD_L2_GRID = (1e-3, 1e-2, 1e-1)


def sizes_of(spec: str, available: int) -> list[int]:
    """``"300,1000,all"`` -> ``[300, 1000, available]`` (sorted, de-duplicated); a clear error for a bad entry."""
    sizes = []
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        n = available if item == "all" else int(item) if item.isdigit() else 0
        if not 2 <= n <= available:
            sys.exit(f"--train-sizes entry {item!r}: use a count from 2 to {available} (the logged train questions "
                     "outside dev) or 'all'.")
        sizes.append(n)
    if not sizes:
        sys.exit("--train-sizes is empty; give e.g. 300,1000,all.")
    return sorted(set(sizes))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train-sizes", default="300,1000,3000,all",
                        help="Comma list of train question counts, or 'all' (every logged train question not in dev).")
    parser.add_argument("--dev-queries", type=int, default=500, help="Logged train questions held out to choose on.")
    parser.add_argument("--test-queries", type=int, default=1000, help="First N of the 1,000 logged test questions.")
    parser.add_argument("--seed", type=int, default=0, help="The shuffle of the logged train questions.")
    parser.add_argument("--base", default=None, help="Local base model whose hidden states the head reads "
                        "(default: the default policy base).")
    parser.add_argument("--max-tokens", type=int, default=160,
                        help="Question tokens the base reads (GSM8K questions run to ~200 tokens).")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/oirl-selector"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if not 1 <= args.test_queries <= 1000 or args.dev_queries < 1:
        sys.exit("--test-queries takes 1 to 1000 and --dev-queries at least 1.")
    started, code = time.perf_counter(), code_version()
    runs = args.out / "runs"
    runs.mkdir(parents=True, exist_ok=True)

    train_outcomes, test_outcomes, texts, aliases = gsm8k_logs(runs)
    prompts = sorted(aliases, key=lambda p: BASE_ALIASES.index(aliases[p]))
    ids = sorted(train_outcomes, key=lambda i: int(i.rsplit("-", 1)[1]))
    random.Random(args.seed).shuffle(ids)
    if args.dev_queries >= len(ids) - 2:
        sys.exit(f"--dev-queries {args.dev_queries} leaves too few of the {len(ids)} logged train questions to fit on.")
    dev_ids, pool_ids = ids[-args.dev_queries:], ids[: -args.dev_queries]
    sizes = sizes_of(args.train_sizes, len(pool_ids))
    test_ids = sorted(test_outcomes, key=lambda i: int(i.rsplit("-", 1)[1]))[: args.test_queries]
    fit_ids = pool_ids[: sizes[-1]]

    def table(split_ids: list[str], outcomes: dict[str, dict[str, bool]]) -> np.ndarray:
        return np.array([[float(outcomes[i][p]) for p in prompts] for i in split_ids])

    hits_fit, hits_dev, hits_test = table(fit_ids, train_outcomes), table(dev_ids, train_outcomes), table(
        test_ids, test_outcomes)
    split_texts = [[texts[i] for i in part] for part in (fit_ids, dev_ids, test_ids)]
    config = SelectorConfig()
    hashed = [text_features(t, config.dim, config.char_ngrams, config.word_bigrams) for t in split_texts]

    # The base's hidden states, read once per (base, token cut, questions) and cached: the longest step.
    key = f"{(args.base or 'default').replace('/', '_')}-t{args.max_tokens}-s{args.seed}-n{len(fit_ids)}-" \
          f"d{len(dev_ids)}-e{len(test_ids)}"
    cache = runs / f"features-{key}.npz"
    feature_seconds = 0.0
    if cache.is_file():
        with np.load(cache) as stored:
            names = sorted({n.rsplit("/", 1)[0] for n in stored.files})
            sets = {n: tuple(stored[f"{n}/{j}"] for j in range(3)) for n in names}
    else:
        t0 = time.perf_counter()
        sets = policy_feature_sets(*split_texts, base=args.base, max_tokens=args.max_tokens)
        feature_seconds = time.perf_counter() - t0
        partial = cache.with_suffix(".partial.npz")
        np.savez(partial, **{f"{n}/{j}": x for n, xs in sets.items() for j, x in enumerate(xs)})
        partial.replace(cache)

    def picked_hits(hits: np.ndarray, picks: np.ndarray) -> list[bool]:
        return [bool(hits[q, j]) for q, j in enumerate(picks)]

    per_size: list[dict[str, Any]] = []
    for n in sizes:
        hits_n, counts_n = hits_fit[:n], np.ones((n, len(prompts)))
        best = int(np.argmax(hits_n.mean(0)))  # ties: the first in the logs' prompt order
        params, selector_l2, _ = fit_outcome_model(hashed[0][:n], hits_n, counts_n, config)
        selector_dev = outcome_logits(params, hashed[1]).argmax(1)
        selector_test = outcome_logits(params, hashed[2]).argmax(1)
        dev_scores: dict[str, float] = {}
        fits: dict[str, dict[str, np.ndarray]] = {}
        for name, (x_fit, x_dev, _) in sets.items():
            for l2 in HEAD_L2_GRID:
                setting = f"{name}, l2 {l2:g}"
                fits[setting], _, _ = fit_outcome_model(x_fit[:n], hits_n, counts_n,
                                                        replace(config, l2_prompt=l2, cv_folds=0))
                dev_scores[setting] = statistics.fmean(
                    picked_hits(hits_dev, outcome_logits(fits[setting], x_dev).argmax(1)))
        chosen = max(dev_scores, key=dev_scores.__getitem__)  # ties: the first (shallower layer, weaker L2)
        head_test = outcome_logits(fits[chosen], sets[chosen.split(",")[0]][2]).argmax(1)
        test = {
            "best_prompt": [bool(h) for h in hits_test[:, best]],
            "selector": picked_hits(hits_test, selector_test),
            "head": picked_hits(hits_test, head_test),
            "oracle": [bool(row.max()) for row in hits_test],
        }
        reference = {"best_prompt": test["best_prompt"], "selector": test["selector"]}
        per_size.append({
            "train_queries": n,
            "train_prompt_accuracy": {aliases[p]: float(a) for p, a in zip(prompts, hits_n.mean(0), strict=True)},
            "best_prompt": aliases[prompts[best]],
            "selector_l2_prompt": selector_l2,
            "dev": {"best_prompt": float(hits_dev[:, best].mean()),
                    "selector": statistics.fmean(picked_hits(hits_dev, selector_dev)),
                    "head_by_setting": dev_scores, "head_chosen": chosen},
            "test": {name: method_row(h, {k: v for k, v in reference.items() if k != name})
                     for name, h in test.items()},
            "prompts_sent": {name: dict(Counter(aliases[prompts[int(j)]] for j in picks).most_common())
                             for name, picks in (("selector", selector_test), ("head", head_test))},
        })

    results = {
        "benchmark": "oirl_selector", "dataset": "gsm8k", "target": "oirl:llama-2-7b-chat (logged)",
        "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        **code, "environment": environment(),
        "settings": {"train_sizes": sizes, "dev_queries": len(dev_ids), "test_queries": len(test_ids),
                     "seed": args.seed, "base": args.base or "default policy base", "max_tokens": args.max_tokens,
                     "layer_fractions": list(POLICY_LAYER_FRACTIONS), "head_l2_grid": list(HEAD_L2_GRID),
                     "selector": config.to_dict()},
        "sizes": per_size,
        "timings": {"feature_seconds": feature_seconds, "total_seconds": time.perf_counter() - started},
    }
    atomic_write_json(args.out / "results.json", results)
    atomic_write_text(args.out / "report.md", report(results))
    plot(results, args.out / "oirl_selector.png")
    print((args.out / "report.md").read_text(encoding="utf-8"))


NAMES = {"best_prompt": "best training prompt (one for all)", "selector": "selector (hashed n-grams)",
         "head": "success head on the base's hidden states", "oracle": "oracle over the 6 prompts (upper bound)"}


def report(results: dict[str, Any]) -> str:
    s = results["settings"]
    lines = [
        "# Per-question prompt choice on LLaMA-2-7B-chat's GSM8K logs, by train size", "",
        f"Command: `{results['command']}`  ", f"Commit: `{results['commit']}`  ",
        f"Dev: {s['dev_queries']} logged train questions; test: the first {s['test_queries']} logged test "
        f"questions; 6 training prompts; seed {s['seed']}; head base: {s['base']} (first {s['max_tokens']} tokens).",
    ]
    for size in results["sizes"]:
        dev = size["dev"]
        lines += ["", f"## {size['train_queries']} train questions", "",
                  f"Best prompt on them: `{size['best_prompt']}`; selector L2 (cross-validated) "
                  f"{size['selector_l2_prompt']:g}; head setting chosen on dev: {dev['head_chosen']} (dev: best prompt "
                  f"{100 * dev['best_prompt']:.1f}, selector {100 * dev['selector']:.1f}, head "
                  f"{100 * dev['head_by_setting'][dev['head_chosen']]:.1f}).", "",
                  "| method | accuracy % [95% CI] | vs best prompt [95% CI] | vs selector [95% CI] |",
                  "|---|---|---|---|"]
        lines += [method_line(NAMES[name], row) for name, row in size["test"].items()]
        lines += ["", "Prompts sent on test: " + "; ".join(
            f"{name}: " + ", ".join(f"{a} {c}" for a, c in sent.items()) for name, sent in size["prompts_sent"].items())]
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    sizes = [s["train_queries"] for s in results["sizes"]]
    for name in ("best_prompt", "selector", "head"):
        rows = [s["test"][name] for s in results["sizes"]]
        acc = [100 * r["accuracy"] for r in rows]
        err = [[a - 100 * r["ci95"][0] for a, r in zip(acc, rows, strict=True)],
               [100 * r["ci95"][1] - a for a, r in zip(acc, rows, strict=True)]]
        ax.errorbar(sizes, acc, yerr=err, marker="o", capsize=3, label=NAMES[name])
    ax.set_xscale("log")
    ax.set_xlabel("logged train questions fit on")
    ax.set_ylabel(f"test accuracy % ({results['settings']['test_queries']} questions)")
    ax.set_title("LLaMA-2-7B-chat GSM8K logs: one prompt vs per-question choice")
    ax.legend(fontsize=8)
    fig.tight_layout()
    partial = path.with_name(path.stem + ".partial.png")
    fig.savefig(partial, dpi=120)
    plt.close(fig)
    partial.replace(path)


if __name__ == "__main__":
    main()
