"""A running ``dedupe-consumer sidecar`` at debug level never logs its secrets."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from dedupe_consumer.testing.pytest_plugin import TopicFactory

from ..kafka_helpers import produce_raw, wait_for
from .test_sidecar import Target, event, free_port, get

pytestmark = pytest.mark.kafka
REPO = Path(__file__).resolve().parents[2]
TOKEN = "tok-Vb71-secret-value"
KEY_PASSWORD = "kp-Qx93-secret-value"


def test_a_running_sidecar_logs_no_secret_at_debug_level(
    kafka_bootstrap: str, kafka_topic: TopicFactory, tmp_path: Path
) -> None:
    topic = kafka_topic(partitions=1)
    produce_raw(kafka_bootstrap, topic, [event("e-0", b"v0")])
    server = Target()
    port = free_port()
    config = tmp_path / "sidecar.toml"
    config.write_text(
        f"""
[kafka]
bootstrap_servers = "{kafka_bootstrap}"
group_id = "{topic}-group"
topics = ["{topic}"]
[kafka.consumer]
"session.timeout.ms" = 6000
"ssl.key.password" = "{KEY_PASSWORD}"
[store]
path = "{tmp_path / "state"}"
[processing]
poll_timeout = "200ms"
dead_letter_topic = "{topic}.dlq"
[sidecar]
target_url = "{server.url}"
listen_port = {port}
[observability]
log_level = "debug"
"""
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEDUPE_")}
    env["DEDUPE_SIDECAR__BEARER_TOKEN"] = TOKEN
    proc = subprocess.Popen(
        [sys.executable, "-m", "dedupe_consumer", "sidecar", "--config", str(config)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        wait_for(lambda: len(server.accepted()) == 1, 90, "e-0 delivered")
        assert server.accepted()[0].header("Authorization") == f"Bearer {TOKEN}".encode()
        assert get(port, "/readyz")[0] == 200
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
        server.close()
    output = (stdout + stderr).decode(errors="replace")
    assert proc.returncode == 0, output[-3000:]
    assert "sidecar_started" in output  # the logs were there to search
    assert TOKEN not in output
    assert KEY_PASSWORD not in output
