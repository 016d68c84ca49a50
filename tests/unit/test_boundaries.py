"""The package's boundaries, read from the source with ``ast`` (nothing is imported).

1. Kafka is an edge: only ``dedupe_consumer/kafka/`` imports ``confluent_kafka``,
   plus ``dedupe_consumer/testing/`` (brokers for tests) and ``dedupe_consumer/demo.py``.
2. Private stays private: a module ``a.b._m`` is imported only by modules inside
   package ``a.b`` (its own modules and subpackages), in the library and in
   everything around it: examples, benchmarks, scripts and tests.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCANNED = ("dedupe_consumer", "examples", "bench", "scripts", "tests")
KAFKA_ALLOWED = ("dedupe_consumer.kafka", "dedupe_consumer.testing", "dedupe_consumer.demo")


def module_name(path: Path) -> str:
    """``dedupe_consumer/kafka/source.py`` -> ``dedupe_consumer.kafka.source``."""
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def imported_modules(source: str, module: str, package: bool) -> Iterator[tuple[int, str]]:
    """``(line, dotted name)`` of everything ``source`` imports, relative imports resolved.

    ``from a.b import c`` yields ``a.b`` and ``a.b.c`` (``c`` may be a module).
    """
    here = module.split(".") if package else module.split(".")[:-1]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - (node.level - 1)] if node.level > 1 else here
                prefix = ".".join([*base, *([node.module] if node.module else [])])
            else:
                prefix = node.module or ""
            yield node.lineno, prefix
            for alias in node.names:
                if alias.name != "*":
                    yield node.lineno, f"{prefix}.{alias.name}"


def is_private(part: str) -> bool:
    return part.startswith("_") and not (part.startswith("__") and part.endswith("__"))


def first_party_module(name: str) -> bool:
    """Does ``name`` name a module or package of this repository?"""
    path = REPO.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def private_module_violation(importer: str, package: bool, imported: str) -> str | None:
    """Why importing ``imported`` from module ``importer`` crosses a private boundary."""
    parts = imported.split(".")
    for i, part in enumerate(parts):
        if not is_private(part):
            continue
        private = ".".join(parts[: i + 1])
        if i == len(parts) - 1 and parts[0] in SCANNED and not first_party_module(private):
            return None  # ``from a import _name``: a private name, not a module
        owner = parts[:i]
        inside = importer.split(".") if package else importer.split(".")[:-1]
        if inside[: len(owner)] == owner:
            return None
        return f"{private} is private to {'.'.join(owner) or 'its top level'}"
    return None


def python_files() -> Iterator[Path]:
    for root in SCANNED:
        yield from sorted((REPO / root).rglob("*.py"))


def kafka_violations(path: Path, source: str) -> list[str]:
    module = module_name(path)
    if any(module == a or module.startswith(a + ".") for a in KAFKA_ALLOWED):
        return []
    lines = {
        line
        for line, name in imported_modules(source, module, is_package(path))
        if name == "confluent_kafka" or name.startswith("confluent_kafka.")
    }
    return [f"{path.relative_to(REPO)}:{line}: imports confluent_kafka" for line in sorted(lines)]


def private_violations(path: Path, source: str) -> list[str]:
    module = module_name(path)
    package = is_package(path)
    found = set()
    for line, name in imported_modules(source, module, package):
        why = private_module_violation(module, package, name)
        if why is not None:
            found.add((line, why))
    return [f"{path.relative_to(REPO)}:{line}: imports {why}" for line, why in sorted(found)]


def test_only_the_kafka_package_imports_confluent_kafka() -> None:
    found = [
        v
        for path in python_files()
        if path.is_relative_to(REPO / "dedupe_consumer")
        for v in kafka_violations(path, path.read_text())
    ]
    assert found == [], "\n".join(found)


def test_no_private_module_is_imported_from_another_package() -> None:
    found = [v for path in python_files() for v in private_violations(path, path.read_text())]
    assert found == [], "\n".join(found)


def test_the_engine_and_the_store_do_not_import_the_kafka_package() -> None:
    """They see the changelog through ``store.StateChangelog``, never its Kafka class."""
    package = REPO / "dedupe_consumer"
    found = [
        f"{path.relative_to(REPO)}:{line}: imports {name}"
        for path in [package / "engine.py", *sorted((package / "store").rglob("*.py"))]
        for line, name in imported_modules(path.read_text(), module_name(path), is_package(path))
        if name == "dedupe_consumer.kafka" or name.startswith("dedupe_consumer.kafka.")
    ]
    assert found == [], "\n".join(found)


def test_the_scan_covers_every_root_and_the_kafka_package() -> None:
    modules = {module_name(p) for p in python_files()}
    for root in SCANNED:
        assert any(m == root or m.startswith(root + ".") for m in modules), root
    assert "dedupe_consumer.kafka.changelog" in modules


# The checks themselves, on imports that must and must not be found.

ENGINE = REPO / "dedupe_consumer" / "engine.py"
STORE_INIT = REPO / "dedupe_consumer" / "store" / "__init__.py"
KAFKA_SOURCE = REPO / "dedupe_consumer" / "kafka" / "source.py"
A_TEST = REPO / "tests" / "unit" / "test_x.py"


@pytest.mark.parametrize(
    "path, line",
    [
        (ENGINE, "import confluent_kafka"),
        (ENGINE, "from confluent_kafka import Producer"),
        (ENGINE, "def f():\n    from confluent_kafka.admin import AdminClient"),
        (STORE_INIT, "from confluent_kafka.cimpl import NewTopic"),
    ],
)
def test_a_kafka_import_outside_kafka_is_found(path: Path, line: str) -> None:
    assert kafka_violations(path, line)


@pytest.mark.parametrize(
    "path, line",
    [
        (KAFKA_SOURCE, "import confluent_kafka"),
        (REPO / "dedupe_consumer" / "testing" / "pytest_plugin.py", "import confluent_kafka"),
        (REPO / "dedupe_consumer" / "demo.py", "from confluent_kafka import Producer"),
        (ENGINE, "from dedupe_consumer.kafka.logs import kafka_error_fields"),
    ],
)
def test_kafka_imports_where_they_belong_pass(path: Path, line: str) -> None:
    assert kafka_violations(path, line) == []


@pytest.mark.parametrize(
    "path, line",
    [
        (A_TEST, "from dedupe_consumer._faults import fault_point"),
        (A_TEST, "import dedupe_consumer._faults"),
        (A_TEST, "from dedupe_consumer import _faults"),
        (A_TEST, "from dedupe_consumer.testing._local_kafka import LocalKafka"),
        (A_TEST, "from ..faults._process import REPO"),
        (KAFKA_SOURCE, "from dedupe_consumer.testing._local_kafka import LocalKafka"),
        (KAFKA_SOURCE, "from confluent_kafka.admin._listoffsets import OffsetSpec"),
        (REPO / "examples" / "x.py", "from dedupe_consumer.testing import _local_kafka"),
    ],
)
def test_a_private_module_from_another_package_is_found(path: Path, line: str) -> None:
    assert private_violations(path, line)


@pytest.mark.parametrize(
    "path, line",
    [
        (ENGINE, "from dedupe_consumer._faults import fault_point"),
        (KAFKA_SOURCE, "from dedupe_consumer._secrets import redact"),
        (REPO / "dedupe_consumer" / "testing" / "__init__.py", "from ._local_kafka import X"),
        (
            REPO / "dedupe_consumer" / "testing" / "pytest_plugin.py",
            "from dedupe_consumer.testing._local_kafka import LocalKafka",
        ),
        (A_TEST, "from dedupe_consumer.engine import _Cut"),  # a private name, not a module
        (A_TEST, "from dedupe_consumer import __version__"),
    ],
)
def test_private_modules_inside_their_package_pass(path: Path, line: str) -> None:
    assert private_violations(path, line) == []
