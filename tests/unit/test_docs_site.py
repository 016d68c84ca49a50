"""The docs site's sources stay consistent; `mkdocs build --strict` (.ci/run) checks links.

These checks need no mkdocs: every page is in the nav, every repository path a
page names exists (pages cannot link outside docs/, so they name files in code
spans), and the README's guarantees table is the one on the Concepts page.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.glob("*.md"))
REPO_PATH = re.compile(r"`((?:examples|config|bench|scripts|tests|docs)/[\w./-]*)`")


def test_every_page_is_in_the_nav() -> None:
    config = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    nav = set(re.findall(r"^\s*-\s+(?:[^:\n]+:\s+)?([\w-]+\.md)\s*$", config, re.MULTILINE))
    assert nav == {page.name for page in PAGES}


def test_every_repository_path_named_in_the_guide_exists() -> None:
    named = 0
    for page in [ROOT / "README.md", *PAGES]:
        for path in REPO_PATH.findall(page.read_text(encoding="utf-8")):
            if "<" in path or "*" in path:
                continue  # a pattern, not a file
            assert (ROOT / path).exists(), f"{page.relative_to(ROOT)} names {path}"
            named += 1
    assert named > 10


def _guarantees_table(text: str) -> str:
    match = re.search(r"^\| crash between \|.*?(?=\n\n)", text, re.MULTILINE | re.DOTALL)
    assert match, "no guarantees table"
    return match.group(0)


def test_the_readme_shows_the_guarantees_table_of_the_concepts_page() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    concepts = (DOCS / "concepts.md").read_text(encoding="utf-8")
    table = _guarantees_table(concepts)
    assert "| cost per batch |" in table
    assert _guarantees_table(readme) == table
