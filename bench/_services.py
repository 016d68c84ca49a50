"""Throwaway Redis and PostgreSQL servers for the hand-written dedupe patterns.

Each server is started by the benchmark as its own process, listening on
127.0.0.1 only, on a free port, with its data in a fresh temporary directory,
and is stopped and deleted when the contender is done, so a run leaves nothing
behind and never touches a system-wide instance. The binaries come from
Debian's ``redis-server`` and ``postgresql`` packages (``bench/setup.sh``).
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path


class ServiceError(RuntimeError):
    """A server could not be started; the message says which binary and why."""


def free_port() -> int:
    """A loopback TCP port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _log_tail(log: Path) -> str:
    try:
        return " | ".join(log.read_text(errors="replace").strip().splitlines()[-5:])
    except OSError:
        return "(no log)"


def _wait_for_port(
    port: int, proc: subprocess.Popen[bytes], what: str, timeout: float, log: Path
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServiceError(
                f"{what} exited with code {proc.returncode} before listening: {_log_tail(log)}"
            )
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.1)
    raise ServiceError(
        f"{what} did not listen on 127.0.0.1:{port} within {timeout:.0f}s: {_log_tail(log)}"
    )


def _stop(proc: subprocess.Popen[bytes], how: signal.Signals, grace: float = 30.0) -> None:
    if proc.poll() is None:
        proc.send_signal(how)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def peak_rss_mb(pid: int) -> float:
    """VmHWM of another process (a server), 0.0 when it cannot be read."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


@contextlib.contextmanager
def redis_server() -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """Yield ``(url, process)`` of a private redis-server; stopped and deleted on exit.

    No persistence (``--save ''``, ``--appendonly no``): the configuration a
    team uses when Redis is "just a cache of seen IDs", and the fastest one.
    """
    binary = shutil.which("redis-server")
    if binary is None:
        raise ServiceError("redis-server is not installed: run bench/setup.sh")
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="bench-redis-") as tmp:
        proc = subprocess.Popen(
            [
                binary,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--protected-mode",
                "yes",
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
                "--dir",
                tmp,
                "--logfile",
                str(Path(tmp) / "redis.log"),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            _wait_for_port(port, proc, "redis-server", 30, Path(tmp) / "redis.log")
            yield f"redis://127.0.0.1:{port}/0", proc
        finally:
            _stop(proc, signal.SIGTERM)  # redis: save nothing, exit


def _postgres_bindir() -> Path:
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/postgres"),
        key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0,
    )
    if not candidates:
        found = shutil.which("postgres")
        if found is None:
            raise ServiceError("PostgreSQL server binaries not found: run bench/setup.sh")
        return Path(found).parent
    return Path(candidates[-1]).parent


@contextlib.contextmanager
def postgres_server() -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """Yield ``(dsn, postmaster)`` of a private PostgreSQL; stopped and deleted on exit.

    ``initdb`` and ``postgres`` refuse to run as root, so as root they run as
    the ``postgres`` user (created by Debian's package) with a data directory
    it owns; the switch happens in the child (``Popen(user=...)``) so the
    process we signal is the postmaster itself, not a wrapper. The server
    keeps its defaults (``fsync=on``, ``synchronous_commit=on``): what an
    application's database is run with.
    """
    bindir = _postgres_bindir()
    owner: pwd.struct_passwd | None = None
    if os.geteuid() == 0:
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError as exc:
            raise ServiceError("running as root but there is no 'postgres' user") from exc
    uid = None if owner is None else owner.pw_uid
    gid = None if owner is None else owner.pw_gid
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="bench-postgres-") as tmp:
        data = Path(tmp) / "data"
        sockets = Path(tmp) / "sockets"
        sockets.mkdir()
        if owner is not None:
            for path in (Path(tmp), sockets):
                os.chown(path, owner.pw_uid, owner.pw_gid)
        init = subprocess.run(
            [
                str(bindir / "initdb"),
                "-D",
                str(data),
                "-U",
                "bench",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--no-locale",
            ],
            capture_output=True,
            text=True,
            check=False,
            cwd=tmp,
            user=uid,
            group=gid,
        )
        if init.returncode != 0:
            raise ServiceError(f"initdb failed: {init.stderr.strip() or init.stdout.strip()}")
        log = (Path(tmp) / "postgres.log").open("wb")
        proc = subprocess.Popen(
            [
                str(bindir / "postgres"),
                "-D",
                str(data),
                "-p",
                str(port),
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                f"unix_socket_directories={sockets}",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=log,
            cwd=tmp,
            user=uid,
            group=gid,
        )
        try:
            _wait_for_port(port, proc, "postgres", 60, Path(tmp) / "postgres.log")
            yield f"host=127.0.0.1 port={port} user=bench dbname=postgres", proc
        finally:
            _stop(proc, signal.SIGINT)  # postgres: "fast" shutdown, no waiting for clients
            log.close()
