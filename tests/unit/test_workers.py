"""``--workers N`` without a broker: the value, each worker's overrides, the supervisor's
restarts, stops and exit codes, with small Python processes standing in for workers."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from dedupe_consumer import Settings
from dedupe_consumer.cli import app
from dedupe_consumer.errors import ConfigError
from dedupe_consumer.sidecar.settings import SidecarAppSettings
from dedupe_consumer.workers import (
    Backoff,
    Supervisor,
    parse_workers,
    worker_commands,
    worker_environments,
)

from ..log_capture import captured_logs

REPO = Path(__file__).resolve().parents[2]
runner = CliRunner()
FAST = Backoff(first_s=0.05, max_s=0.2, reset_after_s=60)


def settings(**sections: Any) -> Settings:
    sections.setdefault(
        "kafka", {"bootstrap_servers": "127.0.0.1:1", "group_id": "g", "topics": ["t"]}
    )
    sections.setdefault("processing", {"dead_letter_topic": "t.dlq"})
    return Settings(**sections)


@pytest.mark.parametrize("value", ["0", "65", "-1", "two", "1.5", ""])
def test_a_bad_workers_value_is_one_line_and_exit_2(tmp_path: Path, value: str) -> None:
    with pytest.raises(ConfigError, match=r"1\.\.64"):
        parse_workers(value)
    result = runner.invoke(
        app, ["run", "-c", str(tmp_path / "none.toml"), "--handler", "x:Y", "--workers", value]
    )
    assert result.exit_code == 2, result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert "--workers" in result.output


def test_each_worker_has_its_own_store_and_port() -> None:
    envs = worker_environments(
        settings(store={"path": "/data/state"}, observability={"metrics_port": 9100}), 3, "run"
    )
    assert [e["DEDUPE_STORE__PATH"] for e in envs] == [f"/data/state/worker-{i}" for i in range(3)]
    assert [e["DEDUPE_OBSERVABILITY__METRICS_PORT"] for e in envs] == ["9100", "9101", "9102"]
    unset = worker_environments(settings(), 2, "run")
    assert all("DEDUPE_OBSERVABILITY__METRICS_PORT" not in e for e in unset)
    anywhere = worker_environments(settings(observability={"metrics_port": 0}), 2, "run")
    assert [e["DEDUPE_OBSERVABILITY__METRICS_PORT"] for e in anywhere] == ["0", "0"]
    with pytest.raises(ConfigError, match="65536 is above 65535"):
        worker_environments(settings(observability={"metrics_port": 65535}), 2, "run")


def test_static_members_get_one_instance_id_per_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEDUPE_KAFKA__CONSUMER", '{"client.id": "c"}')
    configured = settings(
        kafka={
            "bootstrap_servers": "127.0.0.1:1",
            "group_id": "g",
            "topics": ["t"],
            "consumer": {"group.instance.id": "orders-0"},
        }
    )
    envs = worker_environments(configured, 2, "run")
    assert [json.loads(e["DEDUPE_KAFKA__CONSUMER"]) for e in envs] == [
        {"client.id": "c", "group.instance.id": f"orders-0-worker-{i}"} for i in range(2)
    ]
    assert "DEDUPE_KAFKA__CONSUMER" not in worker_environments(settings(), 2, "run")[0]


def test_sidecar_workers_move_the_probe_port_and_the_env_names_are_the_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "sidecar.toml"
    config.write_text("""
[kafka]
bootstrap_servers = "127.0.0.1:1"
group_id = "g"
topics = ["t"]
[processing]
dead_letter_topic = "t.dlq"
[store]
path = "state"
[sidecar]
target_url = "http://127.0.0.1:8080/events"
listen_port = 9400
""")
    loaded = SidecarAppSettings.from_toml(config)
    envs = worker_environments(loaded, 2, "sidecar")
    assert [e["DEDUPE_SIDECAR__LISTEN_PORT"] for e in envs] == ["9400", "9401"]
    for name, value in envs[1].items():  # what a worker reads back from its environment
        monkeypatch.setenv(name, value)
    worker = SidecarAppSettings.from_toml(config)
    assert worker.sidecar is not None and worker.sidecar.listen_port == 9401
    assert worker.store.path == Path("state/worker-1")
    assert worker.sidecar.target_url == loaded.sidecar.target_url  # type: ignore[union-attr]


def test_worker_commands_name_the_index_and_the_supervisor() -> None:
    commands = worker_commands(["run", "--handler", "m:H", "--config", "c.toml"], 2, 42)
    assert commands[1][:3] == [sys.executable, "-m", "dedupe_consumer"]
    assert commands[1][3:] == [
        "run",
        "--handler",
        "m:H",
        "--config",
        "c.toml",
        "--worker-index",
        "1",
        "--supervisor-pid",
        "42",
    ]
    assert "--workers" not in commands[0]


def py(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


# A worker that drains on SIGTERM: exits 0 from its handler.
DRAINS = """
import signal, sys, time
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
print("up", flush=True)
while True:
    time.sleep(0.05)
"""


def test_a_crashed_worker_is_restarted_with_backoff_and_sigterm_stops_all(
    tmp_path: Path,
) -> None:
    starts = tmp_path / "starts"
    crashes_twice = f"""
import os, signal, sys, time
with open({str(starts)!r}, "a") as fh:
    fh.write("x\\n")
if len(open({str(starts)!r}).read().split()) <= 2:
    sys.exit(3)
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
while True:
    time.sleep(0.05)
"""
    sup = Supervisor([py(crashes_twice), py(DRAINS)], [{}, {}], backoff=FAST, grace_s=10)
    with captured_logs() as logs:
        stopper = _stop_when(
            sup, lambda: starts.exists() and len(starts.read_text().split()) >= 3, after_s=0.5
        )
        code = sup.run(install_signal_handlers=False)
    stopper.join()
    assert code == 0
    restarts = [e for e in logs if e["event"] == "worker_restarting"]
    assert [(e["worker"], e["exit_code"], e["delay_s"]) for e in restarts] == [
        (0, 3, 0.05),
        (0, 3, 0.1),
    ]
    assert all(e["log_level"] == "warning" and e["pid"] for e in restarts)
    assert [e["event"] for e in logs][-1] == "workers_stopped"


def test_a_worker_killed_by_a_signal_is_restarted_too(tmp_path: Path) -> None:
    sup = Supervisor([py(DRAINS)], [{}], backoff=FAST, grace_s=10)
    first: list[int] = []

    def kill_then_stop() -> bool:
        pid = sup.pids[0]
        if pid is None:
            return False
        if not first:
            first.append(pid)
            os.kill(pid, signal.SIGKILL)
            return False
        return pid != first[0]

    with captured_logs() as logs:
        stopper = _stop_when(sup, kill_then_stop)
        code = sup.run(install_signal_handlers=False)
    stopper.join()
    assert code == 0
    (restart,) = [e for e in logs if e["event"] == "worker_restarting"]
    assert restart["signal"] == "SIGKILL" and restart["pid"] == first[0]


def test_a_configuration_error_stops_all_without_a_restart_loop() -> None:
    sup = Supervisor(
        [py("import sys, time; time.sleep(0.3); sys.exit(2)"), py(DRAINS)],
        [{}, {}],
        backoff=FAST,
        grace_s=10,
    )
    started = time.monotonic()
    with captured_logs() as logs:
        code = sup.run(install_signal_handlers=False)
    assert code == 2
    assert time.monotonic() - started < 8
    events = [e["event"] for e in logs]
    assert events.count("worker_started") == 2  # none restarted
    assert "worker_configuration_error" in events and "worker_restarting" not in events
    assert sup.pids == [None, None]


def test_workers_that_exit_0_on_their_own_are_not_restarted() -> None:
    sup = Supervisor([py("pass"), py("pass")], [{}, {}], backoff=FAST)
    with captured_logs() as logs:
        assert sup.run(install_signal_handlers=False) == 0
    events = [e["event"] for e in logs]
    assert events.count("worker_finished") == 2 and "worker_restarting" not in events


def test_a_worker_that_does_not_drain_in_the_grace_period_is_killed_and_the_exit_is_1() -> None:
    ignores = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    ignores += "print('up', flush=True)\nwhile True: time.sleep(0.05)"
    sup = Supervisor([py(ignores), py(DRAINS)], [{}, {}], grace_s=0.5)
    with captured_logs() as logs:
        stopper = _stop_when(sup, lambda: True, after_s=1.0)
        code = sup.run(install_signal_handlers=False)
    stopper.join()
    assert code == 1
    (killed,) = [e for e in logs if e["event"] == "worker_killed"]
    assert killed["worker"] == 0


def test_the_supervisor_forwards_sigterm_and_exits_0_when_all_drained(tmp_path: Path) -> None:
    """A real signal to a supervisor process; its workers write a line when they drain."""
    drained, up = tmp_path / "drained", tmp_path / "up"
    worker = f"""
import os, signal, sys, time
def stop(*_):
    open({str(drained)!r}, "a").write("drained\\n")
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
open({str(up)!r}, "a").write(f"{{os.getpid()}}\\n")
while True:
    time.sleep(0.05)
"""
    supervisor = f"""
import sys
from dedupe_consumer.workers import Supervisor
sys.exit(Supervisor([[sys.executable, "-c", {worker!r}]] * 2, [{{}}, {{}}]).run())
"""
    proc = subprocess.Popen(py(supervisor), cwd=REPO, stderr=subprocess.PIPE, text=True)
    try:
        # The workers are up, so the supervisor's signal handlers are installed.
        deadline = time.monotonic() + 20
        while not (up.exists() and len(up.read_text().split()) == 2):
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
        for pid in up.read_text().split() if up.exists() else []:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
    assert proc.returncode == 0, err
    assert drained.read_text().split() == ["drained", "drained"]


def test_a_worker_whose_supervisor_is_gone_stops_itself() -> None:
    """``become_worker`` with a supervisor pid that is not its parent: SIGTERM at once."""
    code = """
import sys
from dedupe_consumer.workers import become_worker
become_worker(0, 1 if __import__("os").getppid() != 1 else 2)
import time; time.sleep(5); sys.exit(7)
"""
    proc = subprocess.run(py(code), cwd=REPO, timeout=20, check=False)
    assert proc.returncode == -signal.SIGTERM


def _stop_when(sup: Supervisor, ready: Any, after_s: float = 0.0) -> Any:
    """A thread that calls ``sup.stop()`` once ``ready()`` holds (then waits ``after_s``)."""
    import threading

    def watch() -> None:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and not ready():
            time.sleep(0.02)
        time.sleep(after_s)
        sup.stop()

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_the_statefulset_example_config_loads_with_its_env(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``config/k8s/consumer-statefulset.yaml``: its consumer.toml and DEDUPE_* env are valid."""
    text = (REPO / "config" / "k8s" / "consumer-statefulset.yaml").read_text()
    block = text.split("consumer.toml: |\n", 1)[1].split("\n---", 1)[0]
    config = tmp_path / "consumer.toml"
    config.write_text(textwrap.dedent(block))
    monkeypatch.setenv("DEDUPE_KAFKA__CONSUMER", '{"group.instance.id": "orders-consumer-2"}')
    loaded = Settings.from_toml(config)
    assert loaded.kafka.consumer["group.instance.id"] == "orders-consumer-2"
    assert loaded.kafka.consumer["session.timeout.ms"] == 45000
    assert loaded.store.path == Path("/var/lib/dedupe/state") and loaded.store.changelog
    assert "mountPath: /var/lib/dedupe}" in text and "volumeClaimTemplates:" in text
