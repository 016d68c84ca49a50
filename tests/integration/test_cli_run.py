"""``dedupe-consumer run`` as a real process, in both log formats, at info level."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from dedupe_consumer.testing.pytest_plugin import TopicFactory

from ..faults.consumer_process import APPEND_HANDLER, REPO, effects_of
from ..kafka_helpers import committed_offsets, end_offsets, produce_events, wait_for

pytestmark = pytest.mark.kafka


def our_log_lines(stderr: str) -> list[str]:
    """stderr without librdkafka's own lines (they start with '%')."""
    return [line for line in stderr.splitlines() if line.strip() and not line.startswith("%")]


def check_log_format(stderr: str, fmt: str) -> list[str]:
    """Every line of ours is in ``fmt``; returns the event names."""
    lines = our_log_lines(stderr)
    if fmt == "json":
        return [json.loads(line)["event"] for line in lines]  # raises on a non-JSON line
    assert not any(line.lstrip().startswith("{") for line in lines), stderr[-2000:]
    return [line.split("]", 1)[1].split()[0] for line in lines if "]" in line]


@pytest.mark.parametrize("fmt", ["console", "json"])
def test_run_logs_every_line_in_the_chosen_format_through_assignment_and_stop(
    kafka_bootstrap: str, kafka_topic: TopicFactory, tmp_path: Path, fmt: str
) -> None:
    topic = kafka_topic(partitions=2)
    sent = produce_events(kafka_bootstrap, topic, 40, duplicates=0.0, seed=3)
    config = tmp_path / "consumer.toml"
    config.write_text(f"""
[kafka]
bootstrap_servers = "{kafka_bootstrap}"
group_id = "{topic}-group"
topics = ["{topic}"]
[kafka.consumer]
"session.timeout.ms" = 6000
"heartbeat.interval.ms" = 500
[store]
path = "{tmp_path / "state"}"
[processing]
poll_timeout = "100ms"
dead_letter_topic = "{topic}.dlq"
[observability]
log_level = "info"
log_format = "{fmt}"
""")
    effects = tmp_path / "effects"
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEDUPE_")}
    env["DEDUPE_TEST_EFFECTS"] = str(effects)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dedupe_consumer",
            "run",
            "-c",
            str(config),
            "--handler",
            APPEND_HANDLER,
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(
            lambda: sum(effects_of(effects).values()) >= len(sent) or proc.poll() is not None,
            90,
            "every event handled",
        )
        assert proc.poll() is None, "the consumer died (see its log below)"
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr[-3000:]
    assert effects_of(effects) == dict.fromkeys(sent, 1)
    ends = end_offsets(kafka_bootstrap, topic, 2)
    assert committed_offsets(kafka_bootstrap, f"{topic}-group", topic, 2) == ends
    events = check_log_format(stderr, fmt)
    assert "partitions_assigned" in events, stderr[-3000:]
    assert "stopped" in events, stderr[-3000:]
