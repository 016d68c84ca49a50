"""``dedupe-consumer run --workers 2`` as real processes on the real broker.

One test walks a supervisor's life (both workers consume, one is SIGKILLed and
restarted, SIGTERM stops all with exit 0); one SIGKILLs the supervisor; one
gives a worker a port that is taken (exit 2, no restart loop).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from dedupe_consumer.testing.pytest_plugin import TopicFactory

from ..faults.consumer_process import APPEND_HANDLER, REPO, effects_of, write_config
from ..faults.suite import Mode, plain_repeat_bound
from ..kafka_helpers import produce_events, wait_for

pytestmark = pytest.mark.kafka
BATCH = 50


def start_workers(
    config: Path, effects: Path, workers: int = 2
) -> tuple[subprocess.Popen[bytes], Path]:
    log = config.parent / "supervisor.log"
    # info: the tests read the workers' partitions_assigned and stopped lines
    config.write_text(config.read_text().replace('log_level = "warning"', 'log_level = "info"'))
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEDUPE_")}
    env["DEDUPE_TEST_EFFECTS"] = str(effects)
    env["PYTHONPATH"] = str(REPO)  # the workers import this checkout, like the supervisor
    with log.open("ab") as err:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "dedupe_consumer",
                "run",
                "--config",
                str(config),
                "--handler",
                APPEND_HANDLER,
                "--workers",
                str(workers),
            ],
            cwd=REPO,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    return proc, log


def events(log: Path, name: str) -> list[dict[str, Any]]:
    found = []
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            entry = json.loads(line)
            if entry.get("event") == name:
                found.append(entry)
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"  # a zombie has exited; its reaper is not ours


def worker_pids(log: Path) -> dict[int, int]:
    """The newest pid of each worker, from the supervisor's ``worker_started`` lines."""
    return {entry["worker"]: entry["pid"] for entry in events(log, "worker_started")}


def cleanup(proc: subprocess.Popen[bytes], log: Path) -> None:
    pids = list(worker_pids(log).values()) if log.exists() else []
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)
    for pid in pids:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


def test_two_workers_handle_each_id_once_survive_a_kill_and_stop_on_sigterm(
    kafka_bootstrap: str, kafka_topic: TopicFactory, tmp_path: Path
) -> None:
    topic = kafka_topic(partitions=4)
    config = write_config(tmp_path, kafka_bootstrap, topic, batch=BATCH)
    effects = tmp_path / "effects"
    proc, log = start_workers(config, effects)
    try:
        # Both in the group first, or the first one up may take all the events.
        wait_for(lambda: {e["worker"] for e in events(log, "assigned")} == {0, 1}, 30, "both")
        sent = produce_events(kafka_bootstrap, topic, 600, duplicates=0.1, seed=17)
        wait_for(lambda: set(effects_of(effects)) == set(sent), 40, "both workers' effects")
        first = effects_of(effects)
        assert max(first.values()) == 1, "an ID took effect twice across the workers"
        assert sorted(p.name for p in (tmp_path / "state").iterdir()) == ["worker-0", "worker-1"]

        victim = worker_pids(log)[0]
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: worker_pids(log)[0] != victim, 15, "worker 0 restarted")
        (restart,) = events(log, "worker_restarting")
        assert (restart["worker"], restart["pid"], restart["signal"]) == (0, victim, "SIGKILL")
        assert restart["delay_s"] == 1.0

        # Old IDs again plus new ones, after the kill: none lost, old ones not repeated.
        more = produce_events(kafka_bootstrap, topic, 300, duplicates=0.3, seed=18, ids=list(sent))
        unique = set(sent) | set(more)
        wait_for(lambda: set(effects_of(effects)) == unique, 40, "effects after the kill")
        counts = effects_of(effects)
        new = set(more) - set(sent)
        assert all(counts[i] == 1 for i in new)
        repeated = sum(n - 1 for n in counts.values())
        # Worker 0 was idle when killed; at worst it repeats its undurable decisions.
        assert repeated <= plain_repeat_bound(Mode("plain"), BATCH), counts.most_common(3)

        pids = worker_pids(log)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log.read_text()[-3000:]
        assert not any(alive(pid) for pid in pids.values())
        stopped = events(log, "stopped")
        assert {e["worker"] for e in stopped} >= {0, 1}, "each worker drained"
        assert events(log, "workers_stopped")[-1]["exit_code"] == 0
    finally:
        cleanup(proc, log)


def test_workers_stop_when_the_supervisor_is_sigkilled(
    kafka_bootstrap: str, kafka_topic: TopicFactory, tmp_path: Path
) -> None:
    topic = kafka_topic(partitions=2)
    config = write_config(tmp_path, kafka_bootstrap, topic)
    proc, log = start_workers(config, tmp_path / "effects")
    try:
        wait_for(lambda: len(events(log, "partitions_assigned")) >= 2, 30, "workers assigned")
        pids = worker_pids(log)
        proc.kill()
        proc.wait(10)
        wait_for(lambda: not any(alive(pid) for pid in pids.values()), 20, "orphans gone")
    finally:
        cleanup(proc, log)


def test_a_worker_configuration_error_stops_all_with_exit_2_and_no_restart(
    kafka_bootstrap: str, kafka_topic: TopicFactory, tmp_path: Path
) -> None:
    """Worker 1's metrics port (port + 1) is taken: it exits 2, and so does the supervisor."""
    topic = kafka_topic(partitions=2)
    config = write_config(tmp_path, kafka_bootstrap, topic)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config.write_text(
            config.read_text().replace(
                "[observability]\n", f"[observability]\nmetrics_port = {port - 1}\n"
            )
        )
        proc, log = start_workers(config, tmp_path / "effects")
        try:
            started = time.monotonic()
            assert proc.wait(40) == 2, log.read_text()[-3000:]
            assert time.monotonic() - started < 30
        finally:
            cleanup(proc, log)
    text = log.read_text()
    assert "observability.metrics_port" in text, text[-2000:]
    assert len(events(log, "worker_started")) == 2  # none restarted
    assert len(events(log, "worker_configuration_error")) == 1
    assert not any(alive(pid) for pid in worker_pids(log).values())
