"""Each "invariant N" in the code and docs names a numbered invariant of docs/architecture.md."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ARCHITECTURE = ROOT / "docs" / "architecture.md"

# "invariant 2", "invariant 5: bounded", "invariants 3 (once per ID) and 4 (nothing lost)"
MENTION = re.compile(
    r"\binvariants?\s+(\d+(?:\s*\([^)]*\))?(?:(?:\s*,\s*|\s+and\s+)\d+(?:\s*\([^)]*\))?)*)"
    r"(?::\s*([a-z][a-z -]*))?",
    re.IGNORECASE,
)


def numbered_invariants(text: str) -> dict[int, str]:
    """The ``## Invariants`` section's ordered list: number -> bold title (without the dot)."""
    match = re.search(r"^## Invariants\n(.*?)(?=^## )", text, re.MULTILINE | re.DOTALL)
    assert match, "docs/architecture.md has no '## Invariants' section"
    items = re.findall(r"^(\d+)\. \*\*(.+?)\.?\*\*", match.group(1), re.MULTILINE)
    return {int(number): title for number, title in items}


def mentions(text: str) -> list[tuple[int, str | None]]:
    """Every invariant number mentioned in ``text``, with the title given after a colon."""
    found: list[tuple[int, str | None]] = []
    for match in MENTION.finditer(text):
        numbers = re.sub(r"\([^)]*\)", "", match.group(1))
        found += [(int(n), match.group(2)) for n in re.findall(r"\d+", numbers)]
    return found


def sources() -> list[Path]:
    files = sorted((ROOT / "dedupe_consumer").rglob("*.py"))
    files += sorted((ROOT / "tests").rglob("*.py")) + sorted((ROOT / "docs").rglob("*.md"))
    return [f for f in files if f.resolve() != Path(__file__).resolve()]


def test_architecture_numbers_the_five_invariants_in_order() -> None:
    invariants = numbered_invariants(ARCHITECTURE.read_text(encoding="utf-8"))
    assert list(invariants) == [1, 2, 3, 4, 5]
    assert invariants[1] == "Commit after persist"
    assert invariants[5] == "Bounded"


def test_mentions_are_found_in_every_form_the_code_uses() -> None:
    text = (
        "(invariant 1: commit after persist). invariant 2 of the design. "
        "against invariants 3 (once per ID) and 4 (nothing lost)."
    )
    assert mentions(text) == [(1, "commit after persist"), (2, None), (3, None), (4, None)]


def test_every_invariant_mention_names_one_that_exists() -> None:
    invariants = numbered_invariants(ARCHITECTURE.read_text(encoding="utf-8"))
    seen = 0
    for path in sources():
        for number, title in mentions(path.read_text(encoding="utf-8")):
            where = f"{path.relative_to(ROOT)}: invariant {number}"
            assert number in invariants, f"{where} is not numbered in docs/architecture.md"
            if title:
                wanted = invariants[number].lower()
                assert wanted.startswith(title.strip().lower()), f"{where} is {wanted!r}"
            seen += 1
    assert seen >= 5, "no mentions found: is the pattern still right?"
