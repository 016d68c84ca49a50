from dedupe_consumer import Settings
from dedupe_consumer.testing.pytest_plugin import ReplayRunner
from examples.replay_test.payments_handler import ChargeHandler


def test_payments_once(replay: ReplayRunner) -> None:
    settings = Settings.from_toml("config/consumer.toml")  # your consumer's own settings
    report = replay(
        ChargeHandler, "payments.jsonl", settings=settings, inject_duplicates=0.2, seed=1
    )
    assert report.ok, report.to_json()
