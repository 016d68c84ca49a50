"""A Confluent-compatible Schema Registry for tests: Apicurio Registry from Maven Central.

Why Apicurio: Confluent's own Schema Registry is not published to Maven
Central and there is no Docker here, but Apicurio Registry is, as a complete
Quarkus application (``io.apicurio:apicurio-registry-app:<version>``, classifier
``all``, a ``tar.gz`` holding the runner jar and its ``lib/``). It serves
Confluent's REST API under ``/apis/ccompat/v7``, which is what confluent-kafka's
``SchemaRegistryClient`` and its Avro, Protobuf and JSON Schema serializers talk.

:func:`resolve_apicurio_registry` fetches and unpacks that archive once per
version into ``~/.cache/dedupe-consumer/schema-registry/<version>/app`` (by
``mvn dependency:unpack-dependencies``, through the same lock-stage-rename
cache as the broker's jars). :class:`LocalSchemaRegistry` runs it with its
default storage, an in-memory H2 database (nothing on disk; a restart forgets
every schema), on a free loopback port, and waits until
``GET /apis/ccompat/v7/subjects`` answers 200.

Apicurio 2.6 runs on Java 17 (the machine's default); 3.x needs Java 21+
(``java=`` or ``$JAVA_HOME``) and starts slower here, so 2.6 is the default.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Final, Self

import structlog

from dedupe_consumer.testing._errors import (
    BrokerUnavailableError,
    SchemaRegistryStartError,
)
from dedupe_consumer.testing._lifecycle import Lifecycle
from dedupe_consumer.testing._local_kafka import (
    _die_with_parent_hook,
    _free_port,
    _java_executable,
    _read_tail,
    _signal_group,
)
from dedupe_consumer.testing._maven import resolve_into_cache

__all__ = [
    "APICURIO_REGISTRY_VERSION",
    "ENV_SCHEMA_REGISTRY_CACHE",
    "ENV_SCHEMA_REGISTRY_VERSION",
    "LocalSchemaRegistry",
    "resolve_apicurio_registry",
]

APICURIO_REGISTRY_VERSION: Final = "2.6.13.Final"
"""The Apicurio Registry release :class:`LocalSchemaRegistry` runs by default."""

ENV_SCHEMA_REGISTRY_VERSION: Final = "DEDUPE_APICURIO_REGISTRY_VERSION"
ENV_SCHEMA_REGISTRY_CACHE: Final = "DEDUPE_SCHEMA_REGISTRY_CACHE"
_DEFAULT_CACHE_DIR: Final = "~/.cache/dedupe-consumer/schema-registry"
_GROUP: Final = "io.apicurio"
_ARTIFACT: Final = "apicurio-registry-app"
_CLASSIFIER: Final = "all"
_ARCHIVE_TYPE: Final = "tar.gz"  # 2.x publishes zip and tar.gz, 3.x only tar.gz

CCOMPAT_PATH: Final = "/apis/ccompat/v7"
"""Where Apicurio serves the Confluent Schema Registry API (v6 is the same API, older path)."""

_CONFLUENT_LIKE_PROPERTIES: Final = {
    # A schema registered again in another formatting (whitespace, key order) is the
    # schema it was, with its ID, as Confluent's registry does; Apicurio's default
    # compares the text and makes a new version with a new ID.
    "registry.ccompat.use-canonical-hash": "true",
}

_STOP_GRACE_S: Final = 15.0
_PORT_ATTEMPTS: Final = 3
_PORT_IN_USE: Final = "seems to be in use by another process"  # Quarkus, on a taken port
_PROBE_INTERVAL_S: Final = 0.25

_log = structlog.get_logger(__name__)


def _pom_xml(version: str) -> str:
    # The archive's own POM lists the app's ~300 dependencies; they are all inside
    # the archive already, so none is resolved (exclusion of everything).
    return f"""<?xml version="1.0" encoding="UTF-8"?>
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>local.dedupe-consumer</groupId>
  <artifactId>schema-registry-app</artifactId>
  <version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency>
      <groupId>{_GROUP}</groupId>
      <artifactId>{_ARTIFACT}</artifactId>
      <version>{version}</version>
      <type>{_ARCHIVE_TYPE}</type>
      <classifier>{_CLASSIFIER}</classifier>
      <exclusions>
        <exclusion>
          <groupId>*</groupId>
          <artifactId>*</artifactId>
        </exclusion>
      </exclusions>
    </dependency>
  </dependencies>
</project>
"""


def _runner_jar(app: Path) -> Path | None:
    """The jar to ``java -jar``: 2.x ships ``<artifact>-<version>-runner.jar`` beside
    ``lib/``, 3.x the fast-jar layout's ``quarkus-run.jar``."""
    fast_jar = app / "quarkus-run.jar"
    if fast_jar.is_file():
        return fast_jar
    return next(iter(sorted(app.glob("*-runner.jar"))), None)


def resolve_apicurio_registry(
    version: str | None = None,
    cache_dir: Path | str | None = None,
) -> Path:
    """Return the directory of an unpacked Apicurio Registry, fetching it once.

    *version* defaults to ``$DEDUPE_APICURIO_REGISTRY_VERSION``, else
    :data:`APICURIO_REGISTRY_VERSION`; *cache_dir* to
    ``$DEDUPE_SCHEMA_REGISTRY_CACHE``, else
    ``~/.cache/dedupe-consumer/schema-registry``. Raises
    :class:`SchemaRegistryStartError` naming Maven and its output when
    the archive cannot be had.
    """
    version = version or os.environ.get(ENV_SCHEMA_REGISTRY_VERSION) or APICURIO_REGISTRY_VERSION
    if not re.fullmatch(r"[A-Za-z0-9._-]+", version):
        raise SchemaRegistryStartError(
            f"Apicurio Registry version {version!r} (from ${ENV_SCHEMA_REGISTRY_VERSION} or "
            "the version argument) is not a Maven version"
        )
    root = Path(
        cache_dir
        if cache_dir is not None
        else os.environ.get(ENV_SCHEMA_REGISTRY_CACHE) or _DEFAULT_CACHE_DIR
    ).expanduser()

    def check(app: Path) -> str | None:
        if _runner_jar(app) is None:
            return "its archive holds neither quarkus-run.jar nor a *-runner.jar"
        return None

    return resolve_into_cache(
        coordinates=f"{_GROUP}:{_ARTIFACT}:{_ARCHIVE_TYPE}:{_CLASSIFIER}:{version}",
        version_dir=root / version,
        name="app",
        pom_xml=_pom_xml(version),
        goal=["dependency:unpack-dependencies", "-DoutputDirectory={out}"],
        check=check,
        error=SchemaRegistryStartError,
        event="schema_registry.app",
    )


def _http_status(url: str, timeout: float) -> int | str:
    """The HTTP status of ``GET url``, or why there was none."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            status: int = response.status
            return status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (urllib.error.URLError, OSError) as exc:
        return f"{type(exc).__name__}: {getattr(exc, 'reason', exc)}"


class LocalSchemaRegistry(Lifecycle):
    """Apicurio Registry (in-memory storage) on a free ``127.0.0.1`` port, for tests.

    ``start()`` resolves the distribution (cached), starts the JVM in its own
    process group with its output in ``<workdir>/registry.log`` and waits until
    the Confluent-compatible API answers; ``stop()`` ends the process group and
    removes the working directory. :attr:`url` is what confluent-kafka's
    ``SchemaRegistryClient({"url": ...})`` takes. Usable as a context manager;
    an atexit hook stops a registry a test forgot to stop, and the JVM is asked
    to die with its parent (``PR_SET_PDEATHSIG``) when started from the main
    thread. Failures raise :class:`SchemaRegistryStartError` saying which
    step failed, with the tail of the registry's log.

    Two settings make it answer as Confluent's registry would: the global
    *compatibility* is set to ``BACKWARD`` (Apicurio's own default is none;
    ``None`` keeps that), and ``registry.ccompat.use-canonical-hash`` is on, so a
    schema sent again in another formatting keeps its ID. *extra_properties* are
    more ``-Dkey=value`` settings for the JVM (they win over those two).
    """

    def __init__(
        self,
        *,
        port: int | None = None,
        startup_timeout: float = 180.0,
        version: str | None = None,
        cache_dir: Path | str | None = None,
        heap_max: str = "384m",
        java: str | None = None,
        compatibility: str | None = "BACKWARD",
        extra_properties: Mapping[str, str] | None = None,
    ) -> None:
        self._requested_port = port
        self._startup_timeout = startup_timeout
        self._version = version
        self._cache_dir = cache_dir
        self._heap_max = heap_max
        self._java = java
        self._compatibility = compatibility
        self._extra_properties = {**_CONFLUENT_LIKE_PROPERTIES, **(extra_properties or {})}
        self._lock = threading.RLock()
        self._process: subprocess.Popen[bytes] | None = None
        self._workdir: Path | None = None
        self._port: int | None = None
        self._spawned_at = 0.0
        self.launch_command: list[str] | None = None
        """The ``java`` command line of the last start (None before one)."""
        self.startup_seconds: float | None = None
        """Seconds from spawning the JVM until the API answered (fetching excluded)."""

    # -- properties ---------------------------------------------------------

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:<port>``: the server's root (health at ``/health/ready``)."""
        if self._port is None:
            raise RuntimeError("LocalSchemaRegistry has not been started")
        return f"http://127.0.0.1:{self._port}"

    @property
    def url(self) -> str:
        """The Confluent-compatible API, for ``SchemaRegistryClient({"url": url})``."""
        return self.base_url + CCOMPAT_PATH

    @property
    def pid(self) -> int | None:
        """PID of the running JVM (also its process-group id), None when stopped."""
        process = self._process
        return process.pid if process is not None and process.poll() is None else None

    @property
    def is_running(self) -> bool:
        return self.pid is not None

    @property
    def workdir(self) -> Path | None:
        """Temporary working directory holding ``registry.log``; None once stopped."""
        return self._workdir

    @property
    def log_file(self) -> Path | None:
        """The registry's console log (Quarkus logs to stdout); None once stopped."""
        return None if self._workdir is None else self._workdir / "registry.log"

    # -- lifecycle ----------------------------------------------------------

    def start(self) -> Self:
        """Resolve the distribution, start the JVM and wait until the API answers."""
        with self._lock:
            if self._workdir is not None:
                raise RuntimeError("LocalSchemaRegistry is already started")
            app = resolve_apicurio_registry(self._version, self._cache_dir)
            jar = _runner_jar(app)
            if jar is None:  # the cache was edited by hand after resolving
                raise SchemaRegistryStartError(f"no runner jar in {app}")
            try:
                java = self._java or _java_executable()
            except BrokerUnavailableError as exc:
                raise SchemaRegistryStartError(str(exc)) from None
            self._workdir = Path(tempfile.mkdtemp(prefix="dedupe-schema-registry-"))
            self._stop_at_exit()
            try:
                self._launch(java, jar)
                if self._compatibility is not None:
                    self._set_global_compatibility(self._compatibility)
            except BaseException:
                self.stop()
                raise
            _log.info(
                "schema_registry.local.started",
                url=self.url,
                pid=self.pid,
                seconds=self.startup_seconds,
            )
            return self

    def _command(self, java: str, jar: Path) -> list[str]:
        assert self._port is not None
        return [
            java,
            "-Xms64m",
            f"-Xmx{self._heap_max}",
            "-XX:+UseSerialGC",
            "-XX:TieredStopAtLevel=1",  # C1 only: a test registry starts, it does not warm up
            "-Djava.awt.headless=true",
            "-Dquarkus.http.host=127.0.0.1",
            f"-Dquarkus.http.port={self._port}",
            *(f"-D{key}={value}" for key, value in self._extra_properties.items()),
            "-jar",
            str(jar),
        ]

    def _launch(self, java: str, jar: Path) -> None:
        """Spawn and wait; a free port taken by someone else between our pick and the JVM's
        bind (Quarkus exits saying so) is picked again, twice at most."""
        for attempt in range(_PORT_ATTEMPTS):
            self._spawn(java, jar)
            try:
                self._await_ready()
                return
            except SchemaRegistryStartError as exc:
                lost_port = _PORT_IN_USE in str(exc) and self._requested_port is None
                if not lost_port or attempt == _PORT_ATTEMPTS - 1:
                    raise
                _log.warning("schema_registry.local.port_taken", port=self._port)
                if self._process is not None:
                    _signal_group(self._process.pid, signal.SIGKILL)
                    self._process.wait(timeout=30.0)
                    self._process = None

    def _spawn(self, java: str, jar: Path) -> None:
        assert self._workdir is not None and self.log_file is not None
        self._port = self._requested_port or _free_port()
        command = self._command(java, jar)
        self.launch_command = command
        with self.log_file.open("ab") as out:
            self._process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self._workdir,
                start_new_session=True,
                preexec_fn=_die_with_parent_hook(),  # noqa: PLW1509 - see its docstring
            )
        self._spawned_at = time.monotonic()
        _log.info("schema_registry.local.spawned", command=" ".join(command), pid=self._process.pid)

    def _await_ready(self) -> None:
        process = self._process
        assert process is not None
        probe = self.url + "/subjects"
        deadline = self._spawned_at + self._startup_timeout
        last: int | str = "no attempt made"
        while True:
            code = process.poll()
            if code is not None:
                raise SchemaRegistryStartError(
                    f"Apicurio Registry exited during start-up (exit {code}).\n{self.log_tail()}"
                )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise SchemaRegistryStartError(
                    f"Apicurio Registry did not answer GET {probe} within "
                    f"{self._startup_timeout:.0f} s (last: {last}).\n{self.log_tail()}"
                )
            last = _http_status(probe, timeout=min(2.0, remaining))
            if last == 200:
                self.startup_seconds = round(time.monotonic() - self._spawned_at, 2)
                return
            time.sleep(_PROBE_INTERVAL_S)

    def _set_global_compatibility(self, level: str) -> None:
        """``PUT /config``: Apicurio's global default is NONE (no rule), Confluent's BACKWARD."""
        request = urllib.request.Request(
            self.url + "/config",
            method="PUT",
            data=json.dumps({"compatibility": level}).encode(),
            headers={"Content-Type": "application/vnd.schemaregistry.v1+json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=10.0) as response:
                answer = json.loads(response.read() or b"{}")
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise SchemaRegistryStartError(
                f"Apicurio Registry started but PUT {self.url}/config "
                f"(compatibility {level}) failed: {exc}.\n{self.log_tail()}"
            ) from None
        if answer.get("compatibility") != level:
            raise SchemaRegistryStartError(
                f"Apicurio Registry answered PUT /config (compatibility {level}) with {answer!r}"
            )

    def stop(self) -> None:
        """SIGTERM the JVM's process group (SIGKILL after a grace period), delete the
        working directory. Idempotent."""
        with self._lock:
            process = self._process
            if process is not None:
                pgid = process.pid  # start_new_session made the JVM its group's leader
                if process.poll() is None:
                    _signal_group(pgid, signal.SIGTERM)
                    try:
                        process.wait(timeout=_STOP_GRACE_S)
                    except subprocess.TimeoutExpired:
                        _log.warning("schema_registry.local.sigkill", pid=pgid)
                        _signal_group(pgid, signal.SIGKILL)
                        process.wait(timeout=30.0)
                _signal_group(pgid, signal.SIGKILL)
                self._process = None
                _log.info("schema_registry.local.stopped", pid=pgid, exit_code=process.returncode)
            if self._workdir is not None:
                shutil.rmtree(self._workdir, ignore_errors=True)
                self._workdir = None
            self._forget_stop_at_exit()

    _repr_name = "LocalSchemaRegistry"

    @property
    def _started(self) -> bool:
        return self._workdir is not None

    def _repr_details(self) -> str:
        where = self.url if self._port is not None else "not started"
        return f"{where}, pid={self.pid}"

    def log_tail(self) -> str:
        """The last few KB of the registry's log, for error messages."""
        log_file = self.log_file
        if log_file is None:
            return ""
        text = _read_tail(log_file)
        return f"--- tail of {log_file} ---\n{text}" if text else "(the registry wrote no log)"
