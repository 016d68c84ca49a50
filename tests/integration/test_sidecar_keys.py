"""End to end: two IDs whose keys used to collide both reach the example receiver."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from dedupe_consumer.testing.pytest_plugin import TopicFactory

from ..kafka_helpers import produce_raw, wait_for
from .test_sidecar import IN_ORDER, _answers, event, free_port, running, sidecar_for

pytestmark = pytest.mark.kafka
REPO = Path(__file__).resolve().parents[2]


def test_an_id_and_the_base64_of_another_are_both_delivered(
    kafka_bootstrap: str, kafka_topic: TopicFactory, tmp_path: Path
) -> None:
    topic = kafka_topic(partitions=1)
    ids = [" pay-1", "IHBheS0x", ":IHBheS0x:", "pay-2"]  # base64(" pay-1") == "IHBheS0x"
    produce_raw(kafka_bootstrap, topic, [event(i, f"v{n}".encode()) for n, i in enumerate(ids)])
    port, out = free_port(), tmp_path / "received.jsonl"
    script = REPO / "examples" / "sidecar_target" / "app.py"
    app = subprocess.Popen(
        [sys.executable, str(script), "--port", str(port), "--out", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        wait_for(lambda: _answers(port, "/healthz"), 30, "the example app to listen")
        sidecar = sidecar_for(
            kafka_bootstrap,
            topic,
            tmp_path,
            f"http://127.0.0.1:{port}/events",
            processing=IN_ORDER,
        )
        with running(sidecar):
            wait_for(lambda: sidecar.consumer.totals.consumed >= len(ids), 90, "all decided")
        lines = [json.loads(line) for line in out.read_text().splitlines()]
    finally:
        app.send_signal(signal.SIGTERM)
        _, stderr = app.communicate(timeout=30)
    assert app.returncode == 0, stderr.decode()[-2000:]
    assert sidecar.consumer.totals.handled == len(ids)
    assert [e["event_id"] for e in lines] == ids  # every one recorded, none as a duplicate
    assert [e["body"] for e in lines] == ["v0", "v1", "v2", "v3"]
    assert len({e["idempotency_key"] for e in lines}) == len(ids)
