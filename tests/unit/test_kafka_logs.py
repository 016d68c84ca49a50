"""librdkafka's own log lines go through structlog, never raw onto stderr (issue 11)."""

from __future__ import annotations

import ast
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "dedupe_consumer"

# The library's own clients, each pointed at a port where nothing listens, each given
# time to fail to connect. librdkafka logs every refusal (FAIL, level 3).
SCRIPT = """
import sys, time
from dedupe_consumer.config import Settings
from dedupe_consumer.kafka.dead_letters import KafkaDeadLetters
from dedupe_consumer.kafka.source import KafkaSource
from dedupe_consumer.observability import configure_logging
from dedupe_consumer.sidecar.health import BrokerCheck

configure_logging("info", "json")
settings = Settings(
    kafka={"bootstrap_servers": sys.argv[1], "group_id": "g", "topics": ["t"],
           "consumer": {"reconnect.backoff.ms": 50}},
    processing={"dead_letter_topic": "t.dlq"},
)

class Listener:
    def prepare(self, tps): return []
    def on_assigned(self, tps, logs=None, restored=None): return {}
    def on_revoked(self, tps): return {}
    def on_lost(self, tps): pass

source = KafkaSource(settings, Listener())
source.poll(10, 1.5)
letters = KafkaDeadLetters(settings, flush_timeout_s=0.5, topic_timeout_s=0.5)
letters._producer.poll(1.5)
check = BrokerCheck(settings.kafka.connection(), timeout_s=1.0)
print(check(), file=sys.stdout)
check.close()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_librdkafka_lines_are_structlog_json_and_nothing_is_raw(tmp_path: Path) -> None:
    script = tmp_path / "clients.py"
    script.write_text(textwrap.dedent(SCRIPT))
    proc = subprocess.run(
        [sys.executable, str(script), f"127.0.0.1:{_free_port()}"],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    raw = [line for line in lines if line.startswith("%")]
    assert raw == [], raw[:3]  # librdkafka's own "%3|...|FAIL|..." format
    records = [json.loads(line) for line in lines]  # every line is a structlog JSON record
    from_librdkafka = [r for r in records if r["event"] == "librdkafka"]
    clients = {r["client"].split("-")[0] for r in from_librdkafka}
    assert clients >= {"rdkafka#consumer", "rdkafka#producer"}, clients
    assert all(r["level"] in ("debug", "info", "warning", "error") for r in from_librdkafka)
    assert any(r["facility"] == "FAIL" for r in from_librdkafka)
    assert any("Connection refused" in r["message"] for r in from_librdkafka)


def _client_calls(path: Path) -> list[ast.Call]:
    tree = ast.parse(path.read_text())
    return [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id in ("Consumer", "Producer", "AdminClient")
    ]


def test_every_client_the_library_creates_gets_the_logger() -> None:
    calls = {path: _client_calls(path) for path in sorted(PACKAGE.rglob("*.py"))}
    assert sum(len(c) for c in calls.values()) >= 10  # the scan finds the clients
    missing = [
        f"{path.relative_to(REPO)}:{call.lineno}"
        for path, found in calls.items()
        for call in found
        if "kafka_log_config()" not in ast.unparse(call)
    ]
    assert missing == []
