"""``config/prometheus-alerts.yaml`` checked and unit-tested by ``promtool``.

``promtool`` comes from Debian's ``prometheus`` package; ``scripts/test.sh`` installs it
when missing. Without it these tests fail (they never skip): the alerts are part of
the product, and an untested alert is one that pages nobody.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "config" / "prometheus-alerts.yaml"
RULE_TESTS = REPO / "config" / "prometheus-alerts.test.yaml"

# For each alert, a looser threshold that its "silent" cases must catch: with it,
# promtool must report a failure for that alert (a series below the real threshold
# now fires, or a case expected silent does not stay so).
LOOSENED = {
    "DedupeDeadLettersRising": ("> 0.1", "> 0"),
    "DedupeUncertainOutcomes": ("> 0", ">= 0"),
    "DedupeMembershipLost": ("> 0", ">= 0"),
    "DedupeOffsetRegression": ("> 0", ">= 0"),
    "DedupeBatchesCut": ("> 5", "> 1"),
    "DedupeCommitFailures": ("> 10", "> 1"),
    "DedupeSlowPersist": ("> 0.5", "> 0.001"),
    "DedupeRetentionTooShort": ("(0.8 *", "(0.01 *"),
    "DedupeSlowRestore": ("> 60", "> 0.1"),
    "DedupeConflictSpike": ("> 0.01", "> 0.0001"),
    "DedupeStoreGrowing": ("> 50e9", "> 1e9"),
    "DedupeConsumerLagGrowing": ("> 1000 and", "> 0 and"),
}


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.fail(
            "promtool not found on PATH: install Debian's prometheus package "
            "(apt-get install prometheus; scripts/test.sh does it when run as root)"
        )
    return found


def run_promtool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool(), *map(str, args)], capture_output=True, text=True, timeout=60, check=False
    )


def alert_names() -> list[str]:
    return re.findall(r"^\s*- alert: (\w+)\s*$", RULES.read_text(), flags=re.M)


def failing_alerts(output: str) -> set[str]:
    return set(re.findall(r"alertname: (\w+), time:", output))


def mutated(tmp_path: Path, expr_for: dict[str, str]) -> Path:
    """A copy of the rules and their tests where each named alert's expr is replaced."""
    lines = RULES.read_text().splitlines()
    alert = None
    for i, line in enumerate(lines):
        if m := re.match(r"^\s*- alert: (\w+)", line):
            alert = m.group(1)
        elif alert in expr_for and (m := re.match(r"^(\s*expr: )(.*)$", line)):
            lines[i] = m.group(1) + expr_for[alert].replace("EXPR", m.group(2))
    (tmp_path / RULES.name).write_text("\n".join(lines) + "\n")
    shutil.copy(RULE_TESTS, tmp_path / RULE_TESTS.name)
    return tmp_path / RULE_TESTS.name


def test_promtool_check_rules() -> None:
    result = run_promtool("check", "rules", RULES)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_names())} rules found" in result.stdout, result.stdout


def test_promtool_unit_tests_pass() -> None:
    result = run_promtool("test", "rules", RULE_TESTS)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout, result.stdout


def test_every_alert_has_a_firing_and_a_silent_case() -> None:
    text = RULE_TESTS.read_text()
    cases = re.findall(r"alertname: (\w+)\n\s+exp_alerts:( \[\])?", text)
    firing = {name for name, empty in cases if not empty}
    silent = {name for name, empty in cases if empty}
    names = set(alert_names())
    assert len(names) == 12, names
    assert names - firing == set(), f"no case where these fire: {names - firing}"
    assert names - silent == set(), f"no case where these stay silent: {names - silent}"
    assert set(LOOSENED) == names


def test_each_firing_case_needs_its_rule(tmp_path: Path) -> None:
    """With every expr replaced by one that never fires, promtool fails for each alert."""
    tests = mutated(tmp_path, dict.fromkeys(alert_names(), "vector(0) > 1"))
    result = run_promtool("test", "rules", tests)
    assert result.returncode != 0
    assert failing_alerts(result.stdout + result.stderr) == set(alert_names()), result.stderr


def test_each_silent_case_needs_its_threshold(tmp_path: Path) -> None:
    """With each threshold loosened, promtool fails for each alert: its silent cases sit
    between the two thresholds, so they test the real one."""
    rules = RULES.read_text()
    loosened: dict[str, str] = {}
    for name, (old, new) in LOOSENED.items():
        rule = rules[rules.index(f"- alert: {name}\n") :]
        expr = re.search(r"^\s*expr: (.*)$", rule, flags=re.M)
        assert expr is not None and expr.group(1).count(old) == 1, (name, old)
        loosened[name] = expr.group(1).replace(old, new)
    result = run_promtool("test", "rules", mutated(tmp_path, loosened))
    assert result.returncode != 0
    assert failing_alerts(result.stdout + result.stderr) == set(alert_names()), result.stderr
