"""The user documentation: README.md stays short (<= 150 lines) and every relative link in README.md,
docs/ and results/ resolves to a file or folder of the repository (and an `#anchor` to a heading of
the page it names)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "results").glob("*.md"))]
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")


def _anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _links(page: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # links inside code blocks are not links
    return LINK.findall(text)


def test_readme_is_at_most_150_lines():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 150


def test_docs_exist_and_are_linked_from_the_readme():
    docs = sorted(p.name for p in (ROOT / "docs").glob("*.md"))
    assert len(docs) >= 6
    readme = set(_links(ROOT / "README.md"))
    assert {f"docs/{d}" for d in docs} - {"docs/architecture.md"} <= readme


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_link_resolves(page):
    bad = []
    for link in _links(page):
        if re.match(r"^[a-z]+:", link):  # http(s), mailto: not checked offline
            continue
        path, _, anchor = link.partition("#")
        target = (page.parent / path).resolve() if path else page
        if not target.exists():
            bad.append(link)
        elif anchor and target.is_file():
            heads = {_anchor(h) for h in re.findall(r"^#+ (.+)$", target.read_text(), re.M)}
            if anchor not in heads:
                bad.append(link)
    assert not bad, f"{page.name}: broken links {bad}"
