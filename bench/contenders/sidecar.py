"""``dedupe-consumer sidecar`` POSTing every unique event to a local target that answers in 2 ms.

This process is the sidecar's surroundings, not the sidecar: it starts the
target (:class:`bench.http_target.HttpTarget`, counting POSTs per
``Idempotency-Key``), writes a settings file with a ``[sidecar]`` section,
runs ``python -m dedupe_consumer sidecar --config ...`` as a child process,
exactly as a user would, and watches the group's committed offsets.

* The clock runs from the first POST to arrive to the moment the committed
  offsets cover the whole topic (polled every 25 ms), like the other rows'
  "first message in hand to last offset committed".
* Then the sidecar gets SIGTERM and must exit 0.
* ``handled`` is the number of distinct IDs delivered and ``redelivered`` the
  POSTs beyond the first per ID: "each exactly once" is ``handled`` equal to
  the unique IDs in the topic and ``redelivered == 0``.
* The peak RSS is the sidecar process's (``RUSAGE_CHILDREN``), not this one's.

``--concurrency`` and ``--ordering`` go to ``[processing]`` when the engine has
them (see :mod:`bench.engine_options`).
"""

from __future__ import annotations

import argparse
import json
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

from confluent_kafka import Consumer, TopicPartition

from bench.child import emit, parse_args
from bench.engine_options import concurrency_settings, processing_fields
from bench.http_target import HttpTarget

POLL_S = 0.025
STOP_GRACE_S = 60.0


def _toml(value: object) -> str:
    """A TOML int, string or list of them (a JSON string is a TOML basic string)."""
    if isinstance(value, list):
        return "[" + ", ".join(_toml(item) for item in value) + "]"
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise TypeError(f"no TOML form for {value!r} here")
    return str(value) if isinstance(value, int) else json.dumps(value)


def settings_toml(sections: dict[str, dict[str, object]]) -> str:
    lines: list[str] = []
    for section, keys in sections.items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {_toml(value)}" for key, value in keys.items()]
        lines.append("")
    return "\n".join(lines)


def config_sections(
    args: argparse.Namespace, *, store: Path, target_url: str, knobs: dict[str, object]
) -> dict[str, dict[str, object]]:
    """The sidecar's settings file: the library's defaults but for the row's own choices.

    The ``[sidecar]`` section's retries and timeouts stay the defaults; the
    health server takes any free port, so rows never collide.
    """
    return {
        "kafka": {
            "bootstrap_servers": args.bootstrap,
            "group_id": args.group,
            "topics": [args.topic],
        },
        "store": {"path": str(store)},
        "processing": {
            "batch_size": args.batch,
            "dead_letter_topic": f"{args.topic}.dlq",
            "poll_timeout": "100ms",  # as in the dedupe rows: a short last batch waits less
            **knobs,
        },
        "sidecar": {"target_url": target_url, "listen_port": 0},
        "observability": {"log_level": "warning", "progress_interval": "0s"},
    }


def committed_total(watcher: Consumer, partitions: list[TopicPartition]) -> int:
    """Sum of the group's committed offsets (an unset one counts 0: the topic starts at 0)."""
    return sum(max(tp.offset, 0) for tp in watcher.committed(partitions, timeout=10))


def main() -> None:
    args = parse_args(__doc__ or "", sleep_ms="2", concurrency="", ordering="")
    knobs, engine = concurrency_settings(
        processing_fields(),
        int(args.concurrency) if args.concurrency else None,
        args.ordering or None,
    )
    workdir = Path(args.workdir)
    watcher = Consumer(
        {"bootstrap.servers": args.bootstrap, "group.id": args.group, "enable.auto.commit": False}
    )
    metadata = watcher.list_topics(args.topic, timeout=30).topics[args.topic]
    partitions = [TopicPartition(args.topic, p) for p in sorted(metadata.partitions)]
    with HttpTarget(float(args.sleep_ms) / 1000) as target:
        config = workdir / "sidecar.toml"
        config.write_text(
            settings_toml(
                config_sections(args, store=workdir / "store", target_url=target.url, knobs=knobs)
            )
        )
        with (workdir / "sidecar.stderr.log").open("wb") as log:
            proc = subprocess.Popen(
                [
                    *(sys.executable, "-m", "bench._die_with_parent"),  # see its docstring
                    *(sys.executable, "-m", "dedupe_consumer", "sidecar", "--config", str(config)),
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
            try:
                consumed = 0
                while consumed < args.events:
                    if proc.poll() is not None:
                        tail = (workdir / "sidecar.stderr.log").read_text(errors="replace")
                        raise SystemExit(
                            f"the sidecar exited with code {proc.returncode} after "
                            f"{consumed} of {args.events} offsets were committed: {tail[-800:]}"
                        )
                    time.sleep(POLL_S)
                    consumed = committed_total(watcher, partitions)
                finished = time.perf_counter()
                proc.send_signal(signal.SIGTERM)
                code = proc.wait(STOP_GRACE_S)
                if code != 0:
                    raise SystemExit(f"the sidecar exited with code {code} on SIGTERM")
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
                watcher.close()
    if target.first_at is None:
        raise SystemExit("every offset was committed but the target got no POST")
    if target.bad_requests or target.unkeyed:
        raise SystemExit(
            f"the target got {target.bad_requests} requests it could not read and "
            f"{target.unkeyed} POSTs without an Idempotency-Key"
        )
    delivered = target.deliveries
    rss_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # KiB on Linux
    emit(
        consumed,
        len(delivered),
        finished - target.first_at,
        engine=engine,
        redelivered=sum(delivered.values()) - len(delivered),
        rss_mb=rss_mb,
    )


if __name__ == "__main__":
    main()
