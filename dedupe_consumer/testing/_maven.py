"""Artifacts from Maven Central, resolved once into a per-version cache.

The Kafka distribution is not needed: ``mvn dependency:copy-dependencies``
resolves ``org.apache.kafka:kafka_2.13`` and its runtime dependencies, plus the
slf4j binding the distribution ships, into ``<cache>/<version>/libs``.
:mod:`dedupe_consumer.testing._local_kafka` runs the broker from there.
:func:`resolve_into_cache` (lock, staging directory, ``.complete`` marker) also
fetches the schema registry's distribution for
:mod:`dedupe_consumer.testing._schema_registry`.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Final

import structlog

from dedupe_consumer.testing._errors import BrokerUnavailableError, output_tail

__all__ = [
    "DEFAULT_MAVEN_ARTIFACT",
    "ENV_CACHE_DIR",
    "ENV_MAVEN_ARTIFACT",
    "KAFKA_VERSION",
    "resolve_into_cache",
    "resolve_kafka_libs",
]

KAFKA_VERSION: Final = "4.1.1"
"""The Apache Kafka release the local broker runs (Scala 2.13 build)."""

DEFAULT_MAVEN_ARTIFACT: Final = f"org.apache.kafka:kafka_2.13:{KAFKA_VERSION}"

# Kafka >= 4 logs through log4j2 behind the slf4j 1.7 API, but the kafka_2.13
# POM only declares slf4j-api and log4j-core at runtime: without the binding the
# distribution ships in libs/, slf4j falls back to its no-op logger and the
# broker log file stays empty -- useless when a start-up fails.
_SLF4J_BINDING: Final = "org.apache.logging.log4j:log4j-slf4j-impl:2.24.3"

ENV_MAVEN_ARTIFACT: Final = "DEDUPE_KAFKA_MAVEN_ARTIFACT"
ENV_CACHE_DIR: Final = "DEDUPE_KAFKA_CACHE"
_DEFAULT_CACHE_DIR: Final = "~/.cache/dedupe-consumer/kafka"
_COMPLETE_MARKER: Final = ".complete"

_MAVEN_TIMEOUT_S: Final = 900.0

_log = structlog.get_logger(__name__)


def _parse_coordinates(coordinates: str) -> tuple[str, str, str]:
    parts = coordinates.strip().split(":")
    if len(parts) != 3 or not all(parts):
        raise BrokerUnavailableError(
            f"maven coordinates {coordinates!r} (from ${ENV_MAVEN_ARTIFACT} or the "
            "maven_artifact argument) must look like group:artifact:version"
        )
    return parts[0], parts[1], parts[2]


def _cache_root(cache_dir: Path | str | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    return Path(os.environ.get(ENV_CACHE_DIR) or _DEFAULT_CACHE_DIR).expanduser()


def _pom_xml(group: str, artifact: str, version: str) -> str:
    binding_group, binding_artifact, binding_version = _SLF4J_BINDING.split(":")
    return f"""<?xml version="1.0" encoding="UTF-8"?>
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>local.dedupe-consumer</groupId>
  <artifactId>kafka-broker-jars</artifactId>
  <version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency>
      <groupId>{group}</groupId>
      <artifactId>{artifact}</artifactId>
      <version>{version}</version>
    </dependency>
    <dependency>
      <groupId>{binding_group}</groupId>
      <artifactId>{binding_artifact}</artifactId>
      <version>{binding_version}</version>
    </dependency>
  </dependencies>
</project>
"""


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive flock so parallel test processes resolve the jars once."""
    with path.open("a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def resolve_into_cache(
    *,
    coordinates: str,
    version_dir: Path,
    name: str,
    pom_xml: str,
    goal: list[str],
    check: Callable[[Path], str | None],
    error: Callable[[str], Exception],
    event: str,
) -> Path:
    """Run one Maven *goal* once into ``<version_dir>/<name>`` and return that directory.

    The goal writes into ``{out}`` (the placeholder in *goal*) inside a staging
    directory next to the target, which is renamed into place only after Maven
    succeeded and *check* (given the staged directory; it returns what is
    wrong, or None) found what it needs there, so a crashed or failed download
    never leaves a half-filled directory that a later run would trust; a file
    lock serialises concurrent resolvers (pytest-xdist workers, two terminals).
    Failures raise ``error(message)``; *event* prefixes the structlog events.
    """
    target = version_dir / name
    if (target / _COMPLETE_MARKER).is_file():
        return target

    mvn = shutil.which("mvn")
    if mvn is None:
        raise error(f"maven (mvn) is not on PATH, so {coordinates} cannot be resolved")
    version_dir.mkdir(parents=True, exist_ok=True)
    with _file_lock(version_dir / ".lock"):
        if (target / _COMPLETE_MARKER).is_file():  # another process won the race
            return target
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=version_dir))
        try:
            (staging / "pom.xml").write_text(pom_xml, encoding="utf-8")
            out = staging / name
            command = [
                mvn,
                "-B",
                "-q",
                "-Dstyle.color=never",
                "-f",
                str(staging / "pom.xml"),
                *(arg.replace("{out}", str(out)) for arg in goal),
            ]
            started = time.monotonic()
            _log.info(f"{event}.resolving", coordinates=coordinates, into=str(target))
            try:
                result = subprocess.run(
                    command,
                    stdin=subprocess.DEVNULL,
                    capture_output=True,
                    text=True,
                    timeout=_MAVEN_TIMEOUT_S,
                    check=False,
                )
            except subprocess.TimeoutExpired as exc:
                raise error(
                    f"maven did not resolve {coordinates} within {_MAVEN_TIMEOUT_S:.0f} s"
                ) from exc
            if result.returncode != 0:
                raise error(
                    f"maven (mvn {goal[0]}) could not resolve {coordinates} "
                    f"(exit {result.returncode}):\n{output_tail(result.stdout + result.stderr)}"
                )
            problem = check(out) if out.is_dir() else f"maven wrote nothing into {out}"
            if problem is not None:
                raise error(f"maven resolved {coordinates} but {problem}")
            (out / _COMPLETE_MARKER).write_text(coordinates + "\n", encoding="utf-8")
            if target.exists():  # leftover without marker, e.g. hand-edited: replace it
                shutil.rmtree(target)
            os.rename(out, target)
            _log.info(
                f"{event}.resolved",
                coordinates=coordinates,
                files=sum(1 for _ in target.rglob("*")),
                seconds=round(time.monotonic() - started, 2),
            )
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def resolve_kafka_libs(
    maven_artifact: str | None = None,
    cache_dir: Path | str | None = None,
) -> Path:
    """Return a directory holding the broker's runtime jars, resolving them once.

    The jars land in ``<cache>/<version>/libs`` (see :func:`resolve_into_cache`
    for how a failed or concurrent download is kept out of it).
    """
    coordinates = maven_artifact or os.environ.get(ENV_MAVEN_ARTIFACT) or DEFAULT_MAVEN_ARTIFACT
    group, artifact, version = _parse_coordinates(coordinates)
    default_group, default_artifact, _ = DEFAULT_MAVEN_ARTIFACT.split(":")
    # Key by version as documented; a different group/artifact (another Scala
    # build, a fork) gets its own directory so it cannot reuse the wrong jars.
    key = version
    if (group, artifact) != (default_group, default_artifact):
        key = re.sub(r"[^A-Za-z0-9._-]", "_", f"{group}_{artifact}_{version}")

    def check(libs: Path) -> str | None:
        main_jar = libs / f"{artifact}-{version}.jar"
        return None if main_jar.is_file() else f"{main_jar.name} is not among the jars"

    return resolve_into_cache(
        coordinates=coordinates,
        version_dir=_cache_root(cache_dir) / key,
        name="libs",
        pom_xml=_pom_xml(group, artifact, version),
        goal=["dependency:copy-dependencies", "-DincludeScope=runtime", "-DoutputDirectory={out}"],
        check=check,
        error=BrokerUnavailableError,
        event="kafka.jars",
    )
