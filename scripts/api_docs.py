"""Generate docs/api.md, the API reference, from the public names' docstrings.

    python scripts/api_docs.py           # write docs/api.md
    python scripts/api_docs.py --check   # exit 1 when docs/api.md is out of date

The reference is generated so that it cannot drift from the code: a test runs
``--check``. It covers what a user writes against: the names exported by
``dedupe_consumer`` (Handler, Event, DedupeConsumer, Settings, errors), the
extension contracts (``dedupe_consumer.contracts``, the edges builders) and the
pytest plugin's fixtures.
"""

from __future__ import annotations

import dataclasses
import enum
import inspect
import itertools
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "api.md"

HEADER = """\
# API reference

Generated from the docstrings by `python scripts/api_docs.py`; do not edit by
hand (a test fails when this page is out of date). The guide starts at
[Concepts](concepts.md); how it is built is in [Architecture](architecture.md).
"""


def _doc(obj: object) -> str:
    return inspect.cleandoc(inspect.getdoc(obj) or "(no docstring)")


def _signature(obj: Callable[..., Any]) -> str:
    try:
        return str(inspect.signature(obj))
    except (TypeError, ValueError):
        return "(...)"


INTERNAL = frozenset({"settings_customise_sources", "on_assigned", "on_revoked"})
"""Public by Python's rules but not for users: pydantic hooks, the source's listener calls."""


def _own_methods(cls: type) -> Iterator[tuple[str, Any]]:
    for name, member in cls.__dict__.items():
        if (name.startswith("_") and name != "__init__") or name in INTERNAL:
            continue
        if isinstance(member, staticmethod | classmethod):
            member = member.__func__
        if inspect.isfunction(member) or isinstance(member, property):
            yield name, member


def _field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings (a string literal right after a field) by field name."""
    import ast

    try:
        tree = ast.parse(inspect.cleandoc("\n" + inspect.getsource(cls)))
    except (OSError, TypeError, SyntaxError):
        return {}
    found: dict[str, str] = {}
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    for before, after in itertools.pairwise(body):
        target = before.target if isinstance(before, ast.AnnAssign) else None
        if isinstance(before, ast.Assign) and len(before.targets) == 1:
            target = before.targets[0]  # an enum member
        if (
            isinstance(target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            found[target.id] = inspect.cleandoc(after.value.value)
    return found


def _enum_section(cls: type[enum.Enum]) -> list[str]:
    lines = [f"## `{cls.__name__}`", "", _doc(cls), ""]
    notes = _field_docs(cls)
    lines += ["| member | value | |", "|---|---|---|"]
    for member in cls:
        note = notes.get(member.name, "").replace("\n", " ")
        lines.append(f"| `{member.name}` | `{member.value}` | {note} |")
    return [*lines, ""]


def _class_section(cls: type, title: str | None = None) -> list[str]:
    lines = [f"## `{title or cls.__name__}`", "", _doc(cls), ""]
    notes = _field_docs(cls)
    if dataclasses.is_dataclass(cls):
        lines += ["| field | type | |", "|---|---|---|"]
        for f in dataclasses.fields(cls):
            kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
            note = notes.get(f.name, "").replace("\n", " ")
            lines.append(f"| `{f.name}` | `{kind}` | {note} |")
        lines.append("")
    elif notes:
        for name, note in notes.items():
            lines += [f"* `{name}`: {note}"]
        lines.append("")
    for name, member in _own_methods(cls):
        if isinstance(member, property):
            lines += [f"### `{cls.__name__}.{name}` (property)", "", _doc(member), ""]
            continue
        if member.__doc__ is None and name == "__init__":
            continue
        lines += [
            f"### `{cls.__name__}.{name}{_signature(member)}`",
            "",
            _doc(member),
            "",
        ]
    return lines


def _function_section(title: str, func: Callable[..., Any]) -> list[str]:
    return [f"## `{title}{_signature(func)}`", "", _doc(func), ""]


def render() -> str:
    sys.path.insert(0, str(ROOT))
    import dedupe_consumer
    from dedupe_consumer import errors
    from dedupe_consumer.testing import pytest_plugin

    lines = [HEADER]
    lines += ["# `dedupe_consumer`", "", _doc(dedupe_consumer), ""]
    for name in ("Handler", "Event", "DedupeConsumer", "Settings", "BatchStats"):
        lines += _class_section(getattr(dedupe_consumer, name))
    for name in ("Decision", "DeadLetterReason"):
        lines += _enum_section(getattr(dedupe_consumer, name))
    lines += ["# Errors", ""]
    for name in sorted(dedupe_consumer.__all__):
        obj = getattr(dedupe_consumer, name)
        if isinstance(obj, type) and issubclass(obj, BaseException):
            base = obj.__mro__[1].__name__
            lines += [f"## `{name}({base})`", "", _doc(obj), ""]
    del errors
    from dedupe_consumer import replay

    lines += ["# Replay (`dedupe_consumer.replay`)", "", _doc(replay), ""]
    lines += [
        f"## `replay_recording{_signature(replay.replay_recording)}`",
        "",
        _doc(replay.replay_recording),
        "",
    ]
    lines += _class_section(replay.ReplayReport)
    lines += _function_section("replay.edges", replay.edges)
    from dedupe_consumer import contracts, kafka

    lines += ["# Extension contracts (`dedupe_consumer.contracts`)", "", _doc(contracts), ""]
    for name in ("Edges", "Source", "AssignmentListener", "PartitionLog", "BatchResult"):
        lines += _class_section(getattr(contracts, name))
    lines += _function_section("kafka.edges", kafka.edges)
    lines += [
        "# pytest fixtures",
        "",
        "Installed with the package (`pip install 'dedupe-consumer[test]'` brings pytest).",
        "",
    ]
    for name in (
        "kafka_broker",
        "kafka_bootstrap",
        "kafka_admin",
        "kafka_topic",
        "kafka_cluster",
        "schema_registry",
        "secured_kafka",
        "replay",
    ):
        fixture = getattr(pytest_plugin, name)
        wrapped = getattr(fixture, "__wrapped__", None) or getattr(
            fixture, "_fixture_function", None
        )
        lines += [f"## `{name}`", "", _doc(wrapped or fixture), ""]
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        if not OUT.exists() or OUT.read_text(encoding="utf-8") != text:
            print(f"{OUT.relative_to(ROOT)} is out of date: run python scripts/api_docs.py")
            return 1
        return 0
    OUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
