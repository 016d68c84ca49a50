#!/usr/bin/env bash
# Installs everything `python -m bench.compare` and `python -m bench.store_scale` need.
#
# * the package itself (editable) and bench/requirements.txt, into this Python;
# * quixstreams into its own virtualenv (bench/requirements-quix.txt), because it
#   pins an older confluent-kafka than dedupe_consumer uses; the Quix contender
#   runs under that virtualenv's interpreter (override with BENCH_QUIX_PYTHON);
# * redis-server and PostgreSQL from Debian's packages, plus Java and Maven for
#   the local Kafka broker. No service is left running: the benchmark starts
#   its own servers on loopback, on free ports, in temporary directories, and
#   stops them; a system-wide instance that the package install started is
#   stopped again here.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
venv=${BENCH_QUIX_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/dedupe-consumer/bench-quix-venv}

need_apt=()
command -v redis-server >/dev/null 2>&1 || need_apt+=(redis-server)
compgen -G "/usr/lib/postgresql/*/bin/postgres" >/dev/null || need_apt+=(postgresql)
command -v java >/dev/null 2>&1 || need_apt+=(default-jre-headless)
command -v mvn >/dev/null 2>&1 || need_apt+=(maven)
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then sudo=(); else sudo=(sudo); fi
  echo "installing ${need_apt[*]}"
  "${sudo[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq "${need_apt[@]}"
  # Debian starts the packaged services where it can; the benchmark never uses them.
  for pkg in "${need_apt[@]}"; do
    case "$pkg" in
      redis-server | postgresql)
        "${sudo[@]}" service "$pkg" stop >/dev/null 2>&1 || true
        ;;
    esac
  done
fi

"$python" -m pip install -q --disable-pip-version-check -e ".[sidecar]"
"$python" -m pip install -q --disable-pip-version-check -r bench/requirements.txt

if [ ! -x "$venv/bin/python" ]; then
  echo "creating the Quix Streams virtualenv at $venv"
  "$python" -m venv "$venv"
fi
"$venv/bin/python" -m pip install -q --disable-pip-version-check -r bench/requirements-quix.txt

echo "ready: python -m bench.compare --events 50000   (Quix runs under $venv/bin/python)"
