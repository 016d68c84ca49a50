"""A real Prometheus for tests and dashboard renders, and the queries of a Grafana dashboard.

:class:`Prometheus` runs the ``prometheus`` binary (Debian's ``prometheus`` package)
on loopback with its storage in a directory of yours, scraping the targets you give
it; :func:`dashboard_queries` lists every panel target of a dashboard JSON with its
Grafana variables replaced, ready for the HTTP API.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any


class PrometheusError(Exception):
    """Prometheus could not be started or did not answer; the message says what to do."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class PanelQuery:
    dashboard: str
    panel: str
    panel_type: str
    grid: Mapping[str, int]
    legend: str
    expr: str
    """With the Grafana variables replaced."""
    raw: str
    """As written in the dashboard."""

    def __str__(self) -> str:
        return f"{self.dashboard} / {self.panel!r}: {self.expr}"


def dashboard_queries(path: Path, variables: Mapping[str, str]) -> list[PanelQuery]:
    """Every panel target of the dashboard at ``path``, with ``$name``/``${name}`` replaced.

    ``variables`` maps a variable name (``topic``, ``__rate_interval``, ``__range``)
    to its value; a variable left in an expr is an error naming it.
    """
    board = json.loads(path.read_text())
    found = []
    for panel in board["panels"]:
        for target in panel.get("targets", []):
            raw = target["expr"]
            expr = re.sub(
                r"\$\{(\w+)\}|\$(\w+)",
                lambda m: variables.get(m.group(1) or m.group(2), m.group(0)),
                raw,
            )
            if "$" in expr:
                raise ValueError(f"{path.name} / {panel['title']!r}: no value for {expr!r}")
            found.append(
                PanelQuery(
                    path.name,
                    panel["title"],
                    panel["type"],
                    panel["gridPos"],
                    target.get("legendFormat", ""),
                    expr,
                    raw,
                )
            )
    return found


class Prometheus:
    """``prometheus`` on ``127.0.0.1:<free port>`` scraping ``targets`` (``host:port``).

    Use as a context manager, or :meth:`start` and :meth:`stop`. ``workdir`` holds its
    configuration, its storage and its log (``prometheus.log``).
    """

    def __init__(
        self,
        targets: Iterable[str],
        workdir: Path,
        *,
        scrape_interval: str = "1s",
        rule_files: Iterable[Path] = (),
        binary: str = "prometheus",
        port: int | None = None,
    ) -> None:
        self.targets = list(targets)
        self.workdir = workdir
        self.scrape_interval = scrape_interval
        self.rule_files = [Path(p).resolve() for p in rule_files]
        self.binary = binary
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Prometheus:
        self.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def log_path(self) -> Path:
        return self.workdir / "prometheus.log"

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def start(self, timeout_s: float = 30.0) -> None:
        """Start it and wait until it is ready; :class:`PrometheusError` if it is not."""
        found = shutil.which(self.binary)
        if found is None:
            raise PrometheusError(
                f"{self.binary!r} not found: install Debian's prometheus package "
                "(apt-get install prometheus; scripts/test.sh does it when run as root)"
            )
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = {
            "global": {
                "scrape_interval": self.scrape_interval,
                "evaluation_interval": self.scrape_interval,
            },
            "rule_files": [str(p) for p in self.rule_files],
            "scrape_configs": [
                {"job_name": "dedupe-consumer", "static_configs": [{"targets": self.targets}]}
            ],
        }
        config_file = self.workdir / "prometheus.yml"
        config_file.write_text(json.dumps(config, indent=2))  # JSON is YAML
        with self.log_path.open("wb") as log:
            self._process = subprocess.Popen(
                [
                    found,
                    f"--config.file={config_file}",
                    f"--storage.tsdb.path={self.workdir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--storage.tsdb.retention.time=1d",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout_s
        while True:
            code = self._process.poll()
            if code is not None:
                raise PrometheusError(
                    f"prometheus exited with code {code} at start-up "
                    f"(log {self.log_path}):\n{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as answer:
                    if answer.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise PrometheusError(
                    f"prometheus at {self.url} not ready after {timeout_s:.0f} s "
                    f"(log {self.log_path}):\n{self.log_tail()}"
                )
            time.sleep(0.2)

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def api(self, path: str, **params: str | float) -> Any:
        """GET ``/api/v1/<path>``; its ``data``, or :class:`PrometheusError`."""
        return api(self.url, path, **params)

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        params: dict[str, str | float] = {"query": expr}
        if at is not None:
            params["time"] = at
        result: list[dict[str, Any]] = self.api("query", **params)["result"]
        return result


def api(base_url: str, path: str, **params: str | float) -> Any:
    """GET ``<base_url>/api/v1/<path>?<params>`` and return its ``data``.

    An unreachable Prometheus or an error answer (a bad expression) raises
    :class:`PrometheusError` naming the URL and the query.
    """
    url = f"{base_url.rstrip('/')}/api/v1/{path}?{urllib.parse.urlencode(params)}"
    try:
        with urllib.request.urlopen(url, timeout=10) as answer:
            body = json.loads(answer.read())
    except urllib.error.HTTPError as exc:  # 400/422: the expression; the body says why
        try:
            body = json.loads(exc.read())
        except ValueError:
            raise PrometheusError(f"{url}: HTTP {exc.code}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise PrometheusError(
            f"cannot reach Prometheus at {base_url} ({getattr(exc, 'reason', exc)}): "
            "is it running, and is the URL right?"
        ) from None
    if body.get("status") != "success":
        raise PrometheusError(f"{params.get('query', path)}: {body.get('error', body)}")
    return body["data"]
