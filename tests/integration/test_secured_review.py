"""Review of issue 17's secured clusters: the cases the merged tests leave out.

Each test here failed on main when written (518a982); they state the behaviour a
user needs, not the current one:

* wrong credentials (a bad SASL password) must stop the start with a clear
  error naming the authentication failure, not hang forever logging
  "Broker transport failure";
* an ``ssl.ca.location`` that names no file must be a configuration error
  (exit 2, one line naming the property), not a traceback;
* Read on the group taken away while running, without a changelog, must stop
  the consumer at once (the refused offset commit says so), not after
  ``session.timeout.ms`` of refused commits logged ten times a second.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from confluent_kafka import Consumer
from confluent_kafka.admin import (  # type: ignore[attr-defined]  # public, not in __all__
    AclOperation,
    NewTopic,
    ResourceType,
)

from dedupe_consumer.testing import Acl, SecuredKafka

from ..faults.consumer_process import APPEND_HANDLER, REPO, effects_of
from ..kafka_helpers import committed_offsets, wait_for
from .test_secured_cluster import PARTITIONS, Case, new_case, produce

pytestmark = pytest.mark.kafka

BAD_CREDENTIALS_LIMIT_S = 30.0
"""A start with a wrong password must end within this (the brokers answer in ms)."""


def _start(config: Path, workdir: Path) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEDUPE_")}
    env["DEDUPE_TEST_EFFECTS"] = str(workdir / "effects")
    command = [sys.executable, "-m", "dedupe_consumer", "run", "-c", str(config)]
    return subprocess.Popen(
        [*command, "--handler", APPEND_HANDLER],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def _rewrite(case: Case, *replacements: tuple[str, str]) -> Path:
    path = case.config()
    text = path.read_text(encoding="utf-8")
    for old, new in replacements:
        assert old in text, old
        text = text.replace(old, new)
    path.write_text(text, encoding="utf-8")
    return path


def _finish(proc: subprocess.Popen[str], limit_s: float) -> tuple[str, bool]:
    """stderr, and whether the process ended by itself within ``limit_s``."""
    try:
        _, stderr = proc.communicate(timeout=limit_s)
        return stderr, True
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        try:
            _, stderr = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, stderr = proc.communicate()
        return stderr, False


def test_a_wrong_password_stops_the_start_naming_the_authentication_failure(
    secured_kafka: SecuredKafka, tmp_path: Path
) -> None:
    case = new_case(secured_kafka, tmp_path, "wrong-password")
    wrong = "not-the-password-" + case.user.password[:4] + "x"
    config = _rewrite(
        case, (f'"sasl.password" = "{case.user.password}"', f'"sasl.password" = "{wrong}"')
    )
    started = time.monotonic()
    proc = _start(config, tmp_path)
    stderr, ended = _finish(proc, BAD_CREDENTIALS_LIMIT_S)
    took = time.monotonic() - started
    print(f"wrong password: ended={ended} after {took:.1f} s, exit {proc.returncode}")
    assert wrong not in stderr and case.user.password not in stderr
    assert ended, (
        f"still starting after {BAD_CREDENTIALS_LIMIT_S:.0f} s with a wrong SASL password; "
        f"what it said:\n{stderr[-3000:]}"
    )
    assert proc.returncode == 2, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert "authentication" in last.lower() and case.user.name in last, last
    assert "Traceback" not in stderr, stderr[-3000:]


def test_a_missing_ca_file_is_a_configuration_error_naming_the_property(
    tmp_path: Path,
) -> None:
    """No broker needed: the clients refuse the property before connecting."""
    missing = tmp_path / "no-such-ca.pem"
    config = tmp_path / "consumer.toml"
    config.write_text(f"""
[kafka]
bootstrap_servers = "127.0.0.1:1"
group_id = "missing-ca"
topics = ["missing-ca"]
[kafka.consumer]
"security.protocol" = "SASL_SSL"
"sasl.mechanism" = "SCRAM-SHA-512"
"sasl.username" = "someone"
"sasl.password" = "s3cret-missing-ca"
"ssl.ca.location" = "{missing}"
[store]
path = "{tmp_path / "state"}"
[processing]
dead_letter_topic = "missing-ca.dlq"
""")
    proc = _start(config, tmp_path)
    stderr, ended = _finish(proc, 60)
    assert ended, stderr[-3000:]
    assert "s3cret-missing-ca" not in stderr
    assert "Traceback" not in stderr, stderr[-3000:]
    assert proc.returncode == 2, stderr[-3000:]
    refusals = [line for line in stderr.splitlines() if line.startswith("configuration error:")]
    assert len(refusals) == 1 and "ssl.ca.location" in refusals[0], stderr[-3000:]


def test_read_on_the_group_taken_away_without_a_changelog_stops_the_consumer_at_once(
    secured_kafka: SecuredKafka, tmp_path: Path
) -> None:
    case = new_case(secured_kafka, tmp_path, "taken-group-nolog")
    # The default session timeout (45 s), as users run it; no changelog: the consumer
    # commits the offsets itself, and its commit is what the broker refuses first.
    config = _rewrite(
        case,
        ('"session.timeout.ms" = 6000\n', ""),
        ('"heartbeat.interval.ms" = 500\n', ""),
        ("changelog = true", "changelog = false"),
    )
    produce(secured_kafka, case.topic, ["evt-1", "evt-2"])
    proc = _start(config, tmp_path)
    effects = tmp_path / "effects"
    try:
        wait_for(
            lambda: sum(effects_of(effects).values()) >= 2 or proc.poll() is not None,
            60,
            "the first events handled",
        )
        assert proc.poll() is None, "the consumer stopped before the right was taken away"
        plain = secured_kafka.broker.bootstrap_servers
        wait_for(
            lambda: (
                sum(committed_offsets(plain, case.group, case.topic, PARTITIONS).values()) > -2000
            ),
            30,
            "the first commit",
        )
        secured_kafka.revoke(case.user, [case.rights()["read group"]])
        revoked = time.monotonic()
        produce(secured_kafka, case.topic, ["evt-3"])
        stderr, ended = _finish(proc, 15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    print(f"read group (no changelog): ended={ended} {time.monotonic() - revoked:.1f} s after")
    refused_commits = stderr.count('"event": "commit_failed"')
    assert ended, (
        f"still running 15 s after Read on the group was taken away "
        f"({refused_commits} refused commits logged meanwhile)"
    )
    assert proc.returncode == 2, stderr[-3000:]
    assert f"READ on group '{case.group}'" in stderr.strip().splitlines()[-1], stderr[-3000:]
    assert refused_commits <= 3, f"{refused_commits} refused commits logged before stopping"


def test_a_consumer_protocol_group_shared_with_another_principal_is_not_refused(
    secured_kafka: SecuredKafka, tmp_path: Path
) -> None:
    """KIP-848: ConsumerGroupDescribe answers TOPIC_AUTHORIZATION_FAILED when any member
    of the group subscribes to a topic this principal may not describe. The consumer
    has every right it needs (Read on its topic and its group) and would run; the
    start-up check must not turn that answer into "lacks READ on group"."""
    case = new_case(secured_kafka, tmp_path, "shared-group")
    other_topic = f"{case.topic}-other"
    admin = secured_kafka.admin()  # kept: its futures die with it
    for future in admin.create_topics([NewTopic(other_topic, 1, 1)]).values():
        future.result()
    other = secured_kafka.add_user(f"other-{case.user.name}")
    secured_kafka.grant(
        other,
        [
            Acl(ResourceType.TOPIC, other_topic, AclOperation.READ),
            Acl(ResourceType.GROUP, case.group, AclOperation.READ),
        ],
    )
    member = Consumer(
        {
            **secured_kafka.client_config(other),
            "group.id": case.group,
            "group.protocol": "consumer",
            "enable.auto.commit": False,
        }
    )
    proc: subprocess.Popen[str] | None = None
    try:
        member.subscribe([other_topic])
        wait_for(lambda: bool(member.poll(0.2) or member.assignment()), 30, "the other member")
        config = _rewrite(
            case,
            ('"session.timeout.ms" = 6000\n', '"group.protocol" = "consumer"\n'),
            ('"heartbeat.interval.ms" = 500\n', ""),
        )
        produce(secured_kafka, case.topic, ["evt-1", "evt-2"])
        proc = _start(config, tmp_path)
        effects = tmp_path / "effects"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            member.poll(0.2)  # stays in the group
            if sum(effects_of(effects).values()) >= 2:
                break
        stderr = ""
        if proc.poll() is not None:
            _, stderr = proc.communicate()
        assert proc.poll() is None, f"refused (exit {proc.returncode}):\n{stderr[-3000:]}"
        assert effects_of(effects) == {"evt-1": 1, "evt-2": 1}
    finally:
        member.close()
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
