"""The user guide and the docs link only to files and headings that exist (a moved section or a renamed result
folder breaks a link silently otherwise)."""
from __future__ import annotations

import re
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)


@cache  # read each page once, however many links point into it
def anchors(page: Path) -> set[str]:
    """GitHub's heading anchors of a Markdown page: lower case, punctuation dropped, spaces to hyphens, a repeated
    anchor numbered."""
    seen: dict[str, int] = {}
    found: set[str] = set()
    for line in FENCE.sub("", page.read_text(encoding="utf-8")).splitlines():
        heading = re.match(r"#{1,6}\s+(.*)", line)
        if not heading:
            continue
        slug = re.sub(r"[^\w\- ]", "", heading.group(1).strip().lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def test_anchor_rules_on_a_hand_made_page(tmp_path: Path) -> None:
    page = tmp_path / "p.md"
    page.write_text("# Loop 2 of `dpo_plain` (seed 2; 2026-12-06, code `0a12fba`)\n## Results\n## Results\n"
                    "```\n# not a heading\n```\n", encoding="utf-8")
    assert anchors(page) == {"loop-2-of-dpo_plain-seed-2-2026-12-06-code-0a12fba", "results", "results-1"}


def broken_links(page: Path) -> list[str]:
    """The relative links of ``page`` (outside code blocks) whose file or heading does not exist."""
    broken = []
    for target in LINK.findall(FENCE.sub("", page.read_text(encoding="utf-8"))):
        if re.match(r"[a-z]+:", target):  # http(s), mailto: not checked here (no network)
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            broken.append(f"{target} (no such heading)")
    return broken


def test_broken_links_are_found(tmp_path: Path) -> None:
    (tmp_path / "other.md").write_text("## Seed 1\n", encoding="utf-8")
    page = tmp_path / "p.md"
    page.write_text("# Top\n[a](other.md#seed-1) [b](#top) [c](https://example.com/x) [d](missing.md) "
                    "[e](other.md#seed-2) [f](#nowhere)\n```\n[g](in-a-code-block.md)\n```\n", encoding="utf-8")
    assert broken_links(page) == ["missing.md (no such file)", "other.md#seed-2 (no such heading)",
                                  "#nowhere (no such heading)"]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(page: Path) -> None:
    broken = broken_links(page)
    assert not broken, f"{page.relative_to(ROOT)} links to: " + "; ".join(broken)
