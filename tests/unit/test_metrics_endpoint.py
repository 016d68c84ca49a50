"""``/metrics`` of ``run``: explicit default (off), a host setting, sidecar coherence."""

from __future__ import annotations

import socket
import urllib.request
from pathlib import Path

import pytest

from dedupe_consumer import DedupeConsumer, Event
from dedupe_consumer.config import ObservabilitySettings
from dedupe_consumer.contracts import AssignmentListener, Edges
from dedupe_consumer.dead_letters import MemoryDeadLetters
from dedupe_consumer.errors import ConfigError
from dedupe_consumer.observability import Metrics
from dedupe_consumer.replay import ReplaySource
from dedupe_consumer.sidecar.runner import sidecar_settings
from dedupe_consumer.sidecar.settings import SidecarAppSettings
from dedupe_consumer.store import RocksStore

from ..log_capture import captured_logs
from .conftest import Recorder, make_settings, rec


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_metrics_default_is_off_on_loopback() -> None:
    defaults = ObservabilitySettings.model_validate({})
    assert defaults.metrics_port is None
    assert defaults.metrics_host == "127.0.0.1"


@pytest.mark.parametrize("host", ["127.0.0.1", "0.0.0.0"])
def test_metrics_are_served_on_the_configured_host_while_running(tmp_path: Path, host: str) -> None:
    port = _free_port()
    settings = make_settings(
        tmp_path / "state", observability={"metrics_port": port, "metrics_host": host}
    )
    scraped: list[str] = []

    class Scraping(Recorder):
        def handle(self, event: Event) -> None:
            super().handle(event)
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                scraped.append(r.read().decode())

    holder: list[ReplaySource] = []

    def source(listener: AssignmentListener) -> ReplaySource:
        holder.append(ReplaySource([rec(0, "a"), rec(1, "b")], listener))
        return holder[0]

    store = RocksStore(tmp_path / "state", retention_ms=10**9)
    try:
        with captured_logs() as logs:
            DedupeConsumer(
                Scraping(),
                settings,
                edges=Edges(source=source, dead_letters=MemoryDeadLetters(), store=store),
            ).run(until=lambda t: holder[0].exhausted, install_signal_handlers=False)
    finally:
        store.close()
    assert len(scraped) == 2
    assert "dedupe_batch_seconds" in scraped[0]
    [serving] = [e for e in logs if e["event"] == "metrics_serving"]
    assert serving["url"] == f"http://{host}:{port}/metrics"
    with pytest.raises(OSError):  # the endpoint ends with run()
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


def test_metrics_host_binds_that_address() -> None:
    server = Metrics().serve(0, "0.0.0.0")
    try:
        assert server.server_address[0] == "0.0.0.0"
    finally:
        server.shutdown()
        server.server_close()


def test_a_port_in_use_is_a_config_error_naming_both_keys() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(ConfigError) as info:
            Metrics().serve(taken.getsockname()[1], "127.0.0.1")
    assert "observability.metrics_port" in str(info.value)
    assert "observability.metrics_host" in str(info.value)


@pytest.mark.parametrize("host", ["", "0.0.0.0:9464", "http://x", "a b"])
def test_a_bad_metrics_host_is_refused(tmp_path: Path, host: str) -> None:
    with pytest.raises(ConfigError) as info:
        make_settings(tmp_path, observability={"metrics_host": host})
    assert "observability.metrics_host" in str(info.value)


def test_the_sidecar_refuses_a_second_metrics_endpoint(tmp_path: Path) -> None:
    settings = SidecarAppSettings.load(
        kafka={"bootstrap_servers": "unused:9092", "group_id": "g", "topics": ["payments"]},
        store={"path": str(tmp_path)},
        processing={"dead_letter_topic": "payments.dlq"},
        observability={"metrics_port": 9464},
        sidecar={
            "target_url": "http://127.0.0.1:8080/events",
            "retry_backoff": "1ms",
            "retry_backoff_max": "5ms",
        },
    )
    with pytest.raises(ConfigError) as info:
        sidecar_settings(settings)
    message = str(info.value)
    assert "observability.metrics_port" in message
    assert "sidecar.listen_port" in message
