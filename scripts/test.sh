#!/usr/bin/env bash
# The whole test suite against a real Kafka broker.
#
# Installs the package with its test and dev extras, makes sure Java 17+ and
# Maven are there (the local broker is Apache Kafka from Maven Central jars, the
# schema registry Apicurio Registry from Maven Central; the tests fetch both) and
# Debian's prometheus package (promtool for the alert tests, prometheus for the
# dashboard test), then runs pytest. The broker comes from KAFKA_BOOTSTRAP_SERVERS, else
# testcontainers (if a Docker daemon answers), else the local jar broker.
# With DEDUPE_REQUIRE_REAL_KAFKA=1 (CI) a test that cannot get a broker fails.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v java >/dev/null 2>&1 || need_apt+=(default-jre-headless)
command -v mvn >/dev/null 2>&1 || need_apt+=(maven)
command -v openssl >/dev/null 2>&1 || need_apt+=(openssl)  # the secured broker's test CA
# promtool and prometheus: the alert rule tests and the dashboard test (a real Prometheus).
command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1 || need_apt+=(prometheus)
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing ${need_apt[*]} (the local Kafka broker needs Java 17+ and Maven; the secured broker, openssl; the alert and dashboard tests, prometheus)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_apt[@]}"
  else
    echo "warning: ${need_apt[*]} missing; the local Kafka broker needs Java 17+ and Maven, the secured broker openssl, the alert and dashboard tests promtool and prometheus (Debian's prometheus package)" >&2
  fi
fi

python3 -m pip install -q --disable-pip-version-check -e ".[dev]"
if [ $# -gt 0 ]; then
  exec python3 -m pytest "$@"
fi

# The whole suite in two pytest processes at once: the unit tests (no broker; they
# mostly compute) beside the broker-bound ones (they mostly wait on the broker, on
# session timeouts and on killed processes). The unit run's output follows the other's;
# the script fails if either does.
unit_log=$(mktemp)
python3 -m pytest -p no:cacheprovider tests/unit >"$unit_log" 2>&1 &
unit_pid=$!
status=0
python3 -m pytest --ignore=tests/unit || status=$?
unit_status=0
wait "$unit_pid" || unit_status=$?
echo "--- tests/unit (run beside the tests above) ---"
cat "$unit_log"
rm -f "$unit_log"
if [ "$status" -ne 0 ]; then
  exit "$status"
fi
exit "$unit_status"
