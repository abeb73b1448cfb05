"""PNG figures of one task's benchmark results (matplotlib, a dev extra): accuracy per method,
accuracy vs loop, rewards per loop, prompt examples."""

from __future__ import annotations

import os
import random
import textwrap
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def write_plots(task: Mapping[str, Any], out_dir: str | os.PathLike[str], name: str | None = None) -> list[Path]:
    """PNG figures for one task's results (``<name>_{accuracy,loops,rewards,examples}.png``, ``name``
    defaulting to the task's): accuracy per method, accuracy vs loop, rewards per loop, prompt examples."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = name or task["task"]
    paths: list[Path] = []
    colors = {"baseline": "#999999", "pool": "#4c72b0", "selection": "#55a868", "upper_bound": "#c44e52",
              "qpo": "#dd8452"}

    # 1. accuracy per method, with CI error bars
    methods = task["methods"]
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(methods) + 1.5))
    ys = list(range(len(methods)))[::-1]
    acc = [m["accuracy"] * 100 for m in methods]
    err = [[max(0.0, (m["accuracy"] - m["ci_low"]) * 100) for m in methods],
           [max(0.0, (m["ci_high"] - m["accuracy"]) * 100) for m in methods]]
    ax.barh(ys, acc, xerr=err, color=[colors.get(m["family"], "#777777") for m in methods], capsize=3)
    ax.set_yticks(ys, [m["method"] for m in methods])
    ax.set_xlabel(f"accuracy on {task['queries']} {task['split']} queries (%), 95% bootstrap CI")
    ax.set_xlim(0, 112)
    ax.set_xticks([0, 20, 40, 60, 80, 100])
    ax.set_title(f"{name}: accuracy per method")
    for y, m in zip(ys, methods, strict=True):
        ax.text(m["ci_high"] * 100 + 1.5, y, f"{m['accuracy'] * 100:.1f}", va="center", fontsize=8)
    fig.tight_layout()
    paths.append(_save(fig, out / f"{name}_accuracy.png", plt))

    # 2. accuracy vs loop
    fig, ax = plt.subplots(figsize=(7, 4))
    qpo = sorted((m for m in methods if m["family"] == "qpo" and m["method"].startswith("qpo_loop")),
                 key=lambda m: m["loop"])
    if qpo:
        xs = [m["loop"] for m in qpo]
        ax.errorbar(xs, [m["accuracy"] * 100 for m in qpo],
                    yerr=[[(m["accuracy"] - m["ci_low"]) * 100 for m in qpo],
                          [(m["ci_high"] - m["accuracy"]) * 100 for m in qpo]],
                    marker="o", capsize=3, color=colors["qpo"], label="QPO greedy (test)")
    collect_acc = [(row["loop"], row["greedy_accuracy_collect"]) for row in task["loops"]
                   if row.get("greedy_accuracy_collect") is not None]
    if collect_acc:
        ax.plot([x for x, _ in collect_acc], [y * 100 for _, y in collect_acc], "--", marker=".",
                color=colors["qpo"], alpha=0.6, label="QPO greedy (collect split)")
    styles = {"best_pool": ":", "selector": "-.", "oracle_pool": "--", "none": ":", "default": "-."}
    for m in methods:
        if m["method"] in styles:
            ax.axhline(m["accuracy"] * 100, linestyle=styles[m["method"]], color=colors.get(m["family"]),
                       label=m["method"], alpha=0.8)
    ax.set_xlabel("loop")
    ax.set_ylabel("accuracy (%)")
    if task["loops"]:
        ax.set_xticks([row["loop"] for row in task["loops"]])
    ax.set_title(f"{name}: accuracy vs loop")
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    paths.append(_save(fig, out / f"{name}_loops.png", plt))

    # 3. reward distribution of new prompts per loop vs D0
    fig, ax = plt.subplots(figsize=(7, 4))
    groups = [("D0", task["d0"]["rewards"])] + [(f"loop {row['loop']}", row["new_rewards"]) for row in task["loops"]
                                                 if row["loop"] >= 2]
    data = [g for _, g in groups if g]
    names = [n for n, g in groups if g]
    if data:
        parts = ax.violinplot(data, showmedians=True)
        for body in parts["bodies"]:  # type: ignore[union-attr]
            body.set_alpha(0.5)
        jitter = random.Random(0)
        for position, values in enumerate(data, start=1):
            ax.scatter([position + jitter.uniform(-0.08, 0.08) for _ in values], values, s=6, alpha=0.4,
                       color="#333333")
        ax.set_xticks(range(1, len(names) + 1), [f"{n}\n(n={len(g)})" for n, g in zip(names, data, strict=True)])
    floors = {row.get("reward_floor") for row in task["loops"] if row.get("reward_floor") is not None}
    for floor in floors:
        ax.axhline(floor, color="#c44e52", linestyle=":", label="reward floor (loops >= 2)")
    if floors:
        ax.legend(fontsize=7)
    ax.set_ylabel("reward")
    ax.set_title(f"{name}: rewards of the prompts each loop added vs D0")
    fig.tight_layout()
    paths.append(_save(fig, out / f"{name}_rewards.png", plt))

    # 4. generated prompt examples per gold label (a table figure)
    rows = []
    for ex in task["examples"]:
        for method, prompt in ex["prompts"].items():
            mark = {True: "✓", False: "✗", None: "?"}[ex["correct"][method]]
            rows.append([ex["label"], textwrap.shorten(ex["query"], 60, placeholder="…"), method,
                         textwrap.fill(textwrap.shorten(prompt or "(empty)", 140, placeholder="…"), 70), mark])
    lines_per_row = [1 + r[3].count("\n") for r in rows]
    total_lines = 1 + sum(lines_per_row)
    fig, ax = plt.subplots(figsize=(14, 0.8 + 0.2 * total_lines))
    ax.axis("off")
    if rows:
        table = ax.table(cellText=rows, colLabels=["gold", "query", "method", "prompt", "ok"], cellLoc="left",
                         colWidths=[0.07, 0.3, 0.1, 0.49, 0.04], bbox=(0.0, 0.0, 1.0, 1.0))
        table.auto_set_font_size(False)
        table.set_fontsize(7)
        for (r, _), cell in table.get_celld().items():
            cell.PAD = 0.02
            cell.set_height((1 if r == 0 else lines_per_row[r - 1]) / total_lines)
    else:
        ax.text(0.5, 0.5, "no examples", ha="center")
    ax.set_title(f"{name}: prompts per query type")
    fig.tight_layout()
    paths.append(_save(fig, out / f"{name}_examples.png", plt))
    return paths


def _save(fig: Any, path: Path, plt: Any) -> Path:
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
