"""A tiny HTTP app that receives events from ``dedupe-consumer sidecar`` (stdlib only).

Every POST becomes one JSON line in ``--out``: the Kafka coordinates, the key,
the forwarded Kafka headers and the body, decoded from the sidecar's base64
markers back to what the producer sent. ``GET /healthz`` answers 200.

It also shows what a receiver should do with ``Idempotency-Key``: remember it,
durably, together with the effect, and answer 200 to a repeat without doing
the work again. The sidecar sends each event once, but a POST whose answer was
lost (a timeout, a crash between the answer and the sidecar's store write)
is sent again after a restart, with the same key.

    python examples/sidecar_target/app.py --port 8080 --out received.jsonl
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import signal
import sys
import threading
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote

HEADER_PREFIX = "Kafka-Header-"  # the sidecar's header_prefix default


def event_id_of(key: bytes) -> bytes:
    """The event ID behind an ``Idempotency-Key``.

    The sidecar sends an ID as it is, or, when it cannot travel as it is (or
    starts with ``:``), as an RFC 8941 byte sequence ``:<base64>:``. Either way the
    key is unique per ID: dedupe on the key as received, decode only to show the ID.
    """
    if len(key) >= 2 and key.startswith(b":") and key.endswith(b":"):
        with contextlib.suppress(ValueError):  # not from the sidecar: show it as it came
            return base64.b64decode(key[1:-1], validate=True)
    return key


def text_or_base64(raw: bytes) -> str | dict[str, str]:
    """JSON cannot hold bytes: UTF-8 text as a string, anything else as {"base64": ...}."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return {"base64": base64.b64encode(raw).decode()}


class Journal:
    """The JSON-lines file plus the set of Idempotency-Keys already in it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock = threading.Lock()
        self.seen: set[str] = set()
        if path.exists():  # a restart keeps deduplicating
            with path.open(encoding="utf-8") as lines:
                self.seen = {json.loads(line)["idempotency_key"] for line in lines if line.strip()}

    def record(self, key: str, entry: dict[str, Any]) -> bool:
        """Append ``entry`` durably unless ``key`` was recorded before; True if appended."""
        with self.lock:
            if key in self.seen:
                return False
            with self.path.open("a", encoding="utf-8") as out:
                out.write(json.dumps(entry, sort_keys=True) + "\n")
                out.flush()
                os.fsync(out.fileno())  # 200 must mean "it happened", even after a crash
            self.seen.add(key)
            return True


def describe(headers: list[tuple[str, bytes]], body: bytes) -> dict[str, Any]:
    """One POST from the sidecar as a JSON-ready dict, base64 markers undone."""

    def last(name: str) -> bytes | None:
        found = [v for k, v in headers if k.lower() == name.lower()]
        return found[-1] if found else None

    def decoded(value: bytes, encoding: bytes | None) -> bytes:
        return base64.b64decode(value) if encoding == b"base64" else value

    encoded_names = {
        n.strip().lower() for n in (last("Kafka-Headers-Base64") or b"").decode().split(",")
    }
    kafka_headers = []
    for name, value in headers:
        if name.lower().startswith(HEADER_PREFIX.lower()):
            raw = base64.b64decode(value) if name.lower() in encoded_names else value
            kafka_headers.append([unquote(name[len(HEADER_PREFIX) :]), text_or_base64(raw)])
    key = last("Kafka-Key")
    return {
        "received_at": datetime.now(UTC).isoformat(),
        # As sent: unique per event ID, whether literal or ":<base64>:".
        "idempotency_key": (last("Idempotency-Key") or b"").decode("latin-1"),
        "event_id": text_or_base64(event_id_of(last("Idempotency-Key") or b"")),
        "topic": (last("Kafka-Topic") or b"").decode(),
        "partition": int(last("Kafka-Partition") or b"-1"),
        "offset": int(last("Kafka-Offset") or b"-1"),
        "key": None if key is None else text_or_base64(decoded(key, last("Kafka-Key-Encoding"))),
        "tombstone": last("Kafka-Tombstone") == b"true",
        "content_type": (last("Content-Type") or b"").decode(),
        "headers": kafka_headers,
        "body": text_or_base64(body),
    }


def make_handler(journal: Journal) -> type[BaseHTTPRequestHandler]:
    class Endpoint(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive: the sidecar reuses its connection

        def do_GET(self) -> None:
            if self.path == "/healthz":
                self.answer(200, {"ok": True})
            else:
                self.answer(404, {"error": "POST events to any path; GET /healthz"})

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            # http.server decodes header bytes as latin-1; encoding back restores them.
            headers = [(k, v.encode("latin-1")) for k, v in self.headers.items()]
            entry = describe(headers, body)
            if not entry["idempotency_key"]:
                self.answer(400, {"error": "Idempotency-Key header is required"})  # permanent
                return
            appended = journal.record(entry["idempotency_key"], entry)
            self.answer(200, {"recorded": appended, "duplicate": not appended})

        def answer(self, status: int, payload: dict[str, Any]) -> None:
            data = json.dumps(payload).encode() + b"\n"
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # one JSON line per event is the log

    return Endpoint


class Server(ThreadingHTTPServer):
    """A thread per connection; the sidecar opens up to ``processing.concurrency`` (32) at once."""

    request_queue_size = 128  # the default backlog of 5 would drop connects in that burst


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--host", default=os.environ.get("HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8080")))
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "received.jsonl")))
    args = parser.parse_args(argv)
    server = Server((args.host, args.port), make_handler(Journal(args.out)))
    # As PID 1 in a container, SIGTERM is ignored unless handled: stop cleanly on it.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    print(
        f"listening on http://{args.host}:{server.server_address[1]}, recording to {args.out}",
        flush=True,
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass  # Ctrl-C
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
