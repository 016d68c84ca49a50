"""A consumer as a real process: its config, its start, its effects file.

Shared by every fault test and the crash soak, so they all kill the same thing.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
APPEND_HANDLER = "tests.faults.handlers:AppendHandler"


def write_config(
    workdir: Path,
    bootstrap: str,
    topic: str,
    *,
    batch: int = 50,
    mode: str = "plain",
    on_uncertain: str = "dead-letter",
    static_member: bool = False,
    store: Path | None = None,
    concurrency: int = 1,
    ordering: str = "key",
    max_unpersisted: int = 1,
    scope: str = "partition",
    reply_topic: str | None = None,
    log_level: str = "warning",
    assignment: str | None = None,
) -> Path:
    """A consumer config in ``workdir``; logs are JSON so tests can read them.

    ``max_unpersisted`` 1 (the default here): no batches gathered while a write is
    persisted, so a plain-mode kill repeats at most two batches (see
    :func:`tests.faults.suite.plain_repeat_bound`). ``log_level`` ``"info"`` also logs
    each assignment, revocation and restore (the storm counts them); ``assignment``
    sets ``partition.assignment.strategy`` (librdkafka's default otherwise)."""
    strategy = f'"partition.assignment.strategy" = "{assignment}"\n' if assignment else ""
    member = f'"group.instance.id" = "{topic}-member"\n' if static_member else ""
    replies = f'reply_topic = "{reply_topic}"\nreply_on_duplicate = true\n' if reply_topic else ""
    path = workdir / "consumer.toml"
    path.write_text(f"""
[kafka]
bootstrap_servers = "{bootstrap}"
group_id = "{topic}-group"
topics = ["{topic}"]
[kafka.consumer]
"session.timeout.ms" = 6000
"heartbeat.interval.ms" = 500
{member}{strategy}
[dedupe]
scope = "{scope}"
[store]
path = "{store or workdir / "state"}"
[processing]
batch_size = {batch}
poll_timeout = "100ms"
dead_letter_topic = "{topic}.dlq"
mode = "{mode}"
on_uncertain = "{on_uncertain}"
concurrency = {concurrency}
ordering = "{ordering}"
max_unpersisted = {max_unpersisted}
{replies}[observability]
log_level = "{log_level}"
log_format = "json"
""")
    return path


def start_consumer(
    config: Path,
    effects: Path,
    *,
    handler: str = APPEND_HANDLER,
    fault: str | None = None,
    after: int = 1,
    flaky: int = 0,
    tag: str | None = None,
) -> subprocess.Popen[bytes]:
    """``python -m dedupe_consumer run``; stderr appends to ``consumer.log`` beside the config.

    ``flaky``: the first attempt of one event in ``flaky`` fails (see
    ``tests.faults.handlers.fail_first_attempt``). ``tag``: written after each effect's
    ID (``tests.faults.handlers.effect_line``), to tell processes sharing one file apart."""
    env = {**os.environ, "DEDUPE_TEST_EFFECTS": str(effects), "DEDUPE_TEST_FLAKY": str(flaky)}
    env.pop("DEDUPE_FAULT_POINT", None)
    env.pop("DEDUPE_TEST_TAG", None)
    if tag is not None:
        env["DEDUPE_TEST_TAG"] = tag
    if fault is not None:
        env["DEDUPE_FAULT_POINT"] = fault
        env["DEDUPE_FAULT_AFTER"] = str(after)
    with log_of(config).open("ab") as err:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "dedupe_consumer",
                "run",
                "--config",
                str(config),
                "--handler",
                handler,
            ],
            cwd=REPO,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )


def log_of(config: Path) -> Path:
    return config.parent / "consumer.log"


def log_tail(config: Path, limit: int = 3000) -> str:
    path = log_of(config)
    return path.read_text(errors="replace")[-limit:] if path.exists() else ""


def effects_of(path: Path) -> Counter[str]:
    """How often each event ID took effect (one line per handler call)."""
    return Counter(event_id for event_id, _ in effect_lines(path))


def effect_lines(path: Path) -> list[tuple[str, str]]:
    """Each handler call in file order: the event ID and the tag of the process that
    made it (``""`` when it was started without one)."""
    if not path.exists():
        return []
    calls = []
    for line in path.read_text().splitlines():
        event_id, _, tag = line.strip().partition(" ")
        if event_id:
            calls.append((event_id, tag))
    return calls


def stop_consumer(proc: subprocess.Popen[bytes], timeout_s: float = 60) -> int:
    """SIGTERM, then wait; a process that does not stop in time is killed (never left
    running after its test) and the timeout is raised."""
    import signal

    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=30)
        raise
