"""A secret setting's value is never printed: not in a configuration error, not in a repr.

The CLI cases run the real ``dedupe-consumer`` command in a subprocess with the
secret in a config file or a ``DEDUPE_*`` variable, and search its whole output.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from dedupe_consumer import ConfigError, Settings
from dedupe_consumer.config import KafkaSettings
from dedupe_consumer.sidecar.settings import SidecarAppSettings

REPO = Path(__file__).resolve().parents[2]
SECRET = "hunter2-Zq8"
"""The value searched for in every output: unlike any key name or message text."""

BASE = """
[kafka]
bootstrap_servers = "127.0.0.1:1"
group_id = "g"
topics = ["t"]
[processing]
dead_letter_topic = "t.dlq"
[sidecar]
target_url = "http://127.0.0.1:8080/events"
"""


def cli(
    tmp_path: Path, command: str, toml: str, env: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "c.toml"
    config.write_text(toml)
    args = ["--config", str(config)]
    if command == "run":
        args += ["--handler", "examples.replay_test.payments_handler:ChargeHandler"]
    clean = {k: v for k, v in os.environ.items() if not k.startswith("DEDUPE_")}
    return subprocess.run(
        [sys.executable, "-m", "dedupe_consumer", command, *args],
        cwd=REPO,
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


CASES: dict[str, tuple[str, dict[str, str], str]] = {
    # name: (extra TOML, env, the key the error must name)
    "bearer token with a trailing newline (a mounted secret)": (
        "",
        {"DEDUPE_SIDECAR__BEARER_TOKEN": SECRET + "\n"},
        "sidecar.bearer_token",
    ),
    "bearer token of the wrong type in the file": (
        f'\n[sidecar.bearer_token]\nvalue = "{SECRET}"\n',
        {},
        "sidecar.bearer_token",
    ),
    "sasl.password of the wrong type in the file": (
        f'[kafka.consumer]\n"sasl.password" = ["{SECRET}"]\n',
        {},
        "kafka.consumer.sasl.password",
    ),
    "ssl.key.password of the wrong type from the environment": (
        "",
        {"DEDUPE_KAFKA__PRODUCER": f'{{"ssl.key.password": {{"x": "{SECRET}"}}}}'},
        "kafka.producer.ssl.key.password",
    ),
    "a mis-spelt secret key is an unknown key": (
        f'bearer_tokn = "{SECRET}"\n',
        {},
        "sidecar.bearer_tokn",
    ),
    "an unknown section holding a secret": (
        f'[kafka.consumerr]\n"SASL.Password" = "{SECRET}"\n',
        {},
        "kafka.consumerr",
    ),
    "a section given as broken JSON text": (
        "",
        {"DEDUPE_SIDECAR": f'{{"bearer_token": "{SECRET}"'},
        "sidecar",
    ),
    "a dict given as broken JSON text": (
        "",
        {"DEDUPE_KAFKA__CONSUMER": f'{{"sasl.password": "{SECRET}",'},
        "DEDUPE_KAFKA__CONSUMER",
    ),
    "a URL with a password": (
        "",
        {"DEDUPE_SIDECAR__TARGET_URL": f"http://user:{SECRET}@127.0.0.1:99999/e"},
        "sidecar.target_url",
    ),
}


def _toml(extra: str) -> str:
    return BASE + "\n" + extra  # BASE ends in [sidecar]: bare keys land there


@pytest.mark.parametrize("command", ["run", "sidecar"])
@pytest.mark.parametrize("case", list(CASES))
def test_rejected_secrets_are_never_printed_by_the_cli(
    tmp_path: Path, command: str, case: str
) -> None:
    extra, env, key = CASES[case]
    proc = cli(tmp_path, command, _toml(extra), env)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output
    assert "configuration error" in output
    assert key in output, output
    assert "Traceback" not in output, output
    assert SECRET not in output, output


def test_secret_keys_are_recognised_by_name() -> None:
    from dedupe_consumer.redaction import is_secret_key

    for key in (
        "sasl.password",
        "ssl.key.password",
        "ssl.keystore.password",
        "SASL.PASSWORD",
        "sasl.oauthbearer.client.secret",
        "bearer_token",
        "my_api_token",
        "ssl.key.pem",
        "sasl.oauthbearer.config",
    ):
        assert is_secret_key(key), key
    for key in ("sasl.username", "ssl.key.location", "session.timeout.ms", "security.protocol"):
        assert not is_secret_key(key), key


def test_settings_repr_and_str_hide_secret_librdkafka_values() -> None:
    settings = SidecarAppSettings.load(
        kafka={
            "bootstrap_servers": "127.0.0.1:1",
            "group_id": "g",
            "topics": ["t"],
            "consumer": {"sasl.password": SECRET, "sasl.username": "alice"},
            "producer": {"ssl.key.password": SECRET},
        },
        processing={"dead_letter_topic": "t.dlq"},
        sidecar={"target_url": f"http://u:{SECRET}@127.0.0.1:8080/e", "bearer_token": SECRET},
    )
    for shown in (repr(settings), str(settings), repr(settings.kafka), str(settings.kafka)):
        assert SECRET not in shown
        assert "alice" in shown  # only secrets are hidden
    for shown in (repr(settings), str(settings), repr(settings.sidecar)):
        assert SECRET not in shown
        assert "http://u:***@127.0.0.1:8080/e" in shown
    # ... while the clients still get the real values.
    assert settings.kafka.consumer["sasl.password"] == SECRET
    assert settings.kafka.connection().config("producer")["sasl.password"] == SECRET
    assert settings.sidecar is not None
    assert settings.sidecar.target_url == f"http://u:{SECRET}@127.0.0.1:8080/e"


def test_secret_query_parameters_of_the_target_url_are_not_shown() -> None:
    """A token in the target URL's query string (``?token=...``) was shown by repr()."""
    url = f"http://127.0.0.1:8080/e?token={SECRET}&api_key={SECRET}&region=eu"
    settings = SidecarAppSettings.load(
        kafka={"bootstrap_servers": "h:9092", "group_id": "g", "topics": ["t"]},
        processing={"dead_letter_topic": "t.dlq"},
        sidecar={"target_url": url},
    )
    assert settings.sidecar is not None
    for shown in (repr(settings), str(settings), repr(settings.sidecar)):
        assert SECRET not in shown
        assert "region=eu" in shown and "token=***" in shown
    assert settings.sidecar.target_url == url  # the client still gets the real one


def test_a_raw_validation_error_does_not_show_inputs() -> None:
    """Users who build models directly get pydantic's error: it must not echo values."""
    with pytest.raises(ValidationError) as info:
        KafkaSettings.model_validate(
            {"bootstrap_servers": "h:1", "group_id": "g", "topics": ["t"], "consumer": [SECRET]}
        )
    assert SECRET not in str(info.value)
    assert SECRET not in repr(info.value)


def test_load_errors_name_the_key_without_the_value() -> None:
    with pytest.raises(ConfigError) as info:
        Settings.load(
            kafka={
                "bootstrap_servers": "h:1",
                "group_id": "g",
                "topics": ["t"],
                "consumer": {"sasl.password": [SECRET]},
            },
            processing={"dead_letter_topic": "t.dlq", "batch_size": "many"},
        )
    message = str(info.value)
    assert "kafka.consumer.sasl.password" in message and "<secret, not shown>" in message
    assert "processing.batch_size = 'many'" in message  # other values are still shown
    assert SECRET not in message
