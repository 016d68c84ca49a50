"""``run --workers N`` and ``sidecar --workers N``: N processes of one group on one machine.

The command given ``--workers N`` (N > 1) becomes a supervisor. It starts N
child processes running the same command without ``--workers`` (``python -m
dedupe_consumer run ... --worker-index i --supervisor-pid P``), in the same
consumer group, each with a store of its own: ``DEDUPE_STORE__PATH`` is
``<store.path>/worker-<i>``. A port a worker listens on is moved by its index:
``observability.metrics_port`` (``run``) or ``sidecar.listen_port``
(``sidecar``) + i; port 0 (any free port) stays 0. The supervisor itself holds
no partitions, store or port.

Supervision:

* a worker that exits non-zero or dies by a signal is started again after a
  backoff (1 s doubling to 30 s; a worker that stayed up 60 s starts from 1 s
  again), one ``worker_restarting`` warning each time;
* a worker that exits 2 (a configuration error: its settings, handler or port)
  is not restarted: the supervisor stops the others and exits 2;
* a worker that exits 0 on its own was asked to stop (someone signalled its
  pid): it is not restarted; the supervisor exits 0 once every worker has;
* SIGTERM or SIGINT to the supervisor is forwarded as SIGTERM to every worker,
  each drains (persists, commits) and exits 0; the supervisor waits up to
  :data:`GRACE_S`, then SIGKILLs what is left and exits 1; 0 if all stopped in time.

A worker must not outlive a supervisor that was SIGKILLed: on Linux it asks the
kernel for SIGTERM when its parent dies (``PR_SET_PDEATHSIG``), elsewhere a
thread watches its parent's pid. Either way it drains and exits as on SIGTERM.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from dedupe_consumer.errors import ConfigError

if TYPE_CHECKING:
    from dedupe_consumer.config import Settings

__all__ = [
    "GRACE_S",
    "MAX_WORKERS",
    "Backoff",
    "Supervisor",
    "become_worker",
    "parse_workers",
    "supervise",
    "worker_commands",
    "worker_environments",
]

log = structlog.get_logger("dedupe_consumer.workers")

MAX_WORKERS = 64
"""The most ``--workers`` takes; more partitions per machine want more machines."""

GRACE_S = 30.0
"""How long the supervisor waits for its workers to drain after SIGTERM before SIGKILL."""

CONFIG_ERROR_EXIT = 2
"""A command's exit code for a configuration error (``cli_support.reporting_errors``)."""

PR_SET_PDEATHSIG = 1


def parse_workers(text: str) -> int:
    """``--workers``'s value as an int 1..:data:`MAX_WORKERS`; ConfigError in one line if not."""
    try:
        count = int(text)
    except ValueError:
        count = 0
    if not 1 <= count <= MAX_WORKERS:
        raise ConfigError(
            f"--workers {text!r}: expected a whole number 1..{MAX_WORKERS} "
            "(worker processes of the consumer group on this machine)"
        )
    return count


def worker_environments(settings: Settings, count: int, command: str) -> list[dict[str, str]]:
    """The ``DEDUPE_*`` overrides of each worker: its store directory and its port.

    ``command`` is ``run`` (``observability.metrics_port`` moves) or ``sidecar``
    (``sidecar.listen_port`` moves). Raises ConfigError when port + count - 1
    passes 65535.
    """
    port_setting, port = _port_of(settings, command)
    if port and port + count - 1 > 65535:
        raise ConfigError(
            f"{port_setting} = {port} with --workers {count}: worker i listens on port + i, "
            f"and {port + count - 1} is above 65535; choose a lower port (or 0: any free port)"
        )
    instance = settings.kafka.consumer.get("group.instance.id")
    envs = []
    for index in range(count):
        env = {"DEDUPE_STORE__PATH": str(settings.store.path / f"worker-{index}")}
        if port is not None:
            name = "DEDUPE_" + port_setting.upper().replace(".", "__")
            env[name] = str(port + index if port else 0)
        if instance:
            # Static membership: one member ID per worker, or they would fence each other.
            env[CONSUMER_ENV] = json.dumps(
                {**_consumer_env(), "group.instance.id": f"{instance}-worker-{index}"}
            )
        envs.append(env)
    return envs


CONSUMER_ENV = "DEDUPE_KAFKA__CONSUMER"


def _consumer_env() -> dict[str, Any]:
    """Our own ``DEDUPE_KAFKA__CONSUMER`` table (already valid: the settings loaded)."""
    for name, value in os.environ.items():
        if name.upper() == CONSUMER_ENV:
            table = json.loads(value)
            return table if isinstance(table, dict) else {}
    return {}


def _port_of(settings: Settings, command: str) -> tuple[str, int | None]:
    if command == "sidecar":
        sidecar = getattr(settings, "sidecar", None)
        return "sidecar.listen_port", None if sidecar is None else int(sidecar.listen_port)
    return "observability.metrics_port", settings.observability.metrics_port


def worker_commands(command: Sequence[str], count: int, supervisor_pid: int) -> list[list[str]]:
    """``python -m dedupe_consumer COMMAND...`` for each worker, with its index and our pid.

    ``command`` is the command line after ``dedupe-consumer`` without ``--workers``.
    """
    return [
        [
            sys.executable,
            "-m",
            "dedupe_consumer",
            *command,
            "--worker-index",
            str(index),
            "--supervisor-pid",
            str(supervisor_pid),
        ]
        for index in range(count)
    ]


def become_worker(index: int, supervisor_pid: int | None) -> None:
    """In a worker: die with the supervisor, and name the worker on every log line.

    Call after ``configure_logging``. SIGTERM on the supervisor's death drains as a
    stop does. A supervisor already gone before this ran: SIGTERM at once.
    """
    cfg = structlog.get_config()
    processors = list(cfg["processors"])

    def add_worker(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        event.setdefault("worker", index)
        return event

    structlog.configure(processors=[add_worker, *processors])
    if supervisor_pid is None:
        return
    watched = False
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = __import__("ctypes").CDLL(None, use_errno=True)
            watched = libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM) == 0
    if os.getppid() != supervisor_pid:
        os.kill(os.getpid(), signal.SIGTERM)
        return
    if not watched:
        threading.Thread(
            target=_watch_parent, args=(supervisor_pid,), name="watch-supervisor", daemon=True
        ).start()


def _watch_parent(supervisor_pid: int) -> None:
    while os.getppid() == supervisor_pid:
        time.sleep(1.0)
    os.kill(os.getpid(), signal.SIGTERM)


@dataclass(frozen=True, slots=True)
class Backoff:
    """Restart delays: ``first_s`` doubling up to ``max_s``; reset after ``reset_after_s`` up."""

    first_s: float = 1.0
    max_s: float = 30.0
    reset_after_s: float = 60.0

    def delay(self, failures: int) -> float:
        """The wait before the restart that follows ``failures`` failures in a row (>= 1)."""
        return float(min(self.first_s * 2 ** max(failures - 1, 0), self.max_s))


@dataclass(slots=True)
class _Worker:
    index: int
    command: list[str]
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    failures: int = 0
    restart_at: float | None = None
    finished: bool = False  # exited 0 on its own: not restarted
    exits: list[int] = field(default_factory=list)


def _describe(returncode: int) -> dict[str, object]:
    if returncode < 0:
        with contextlib.suppress(ValueError):
            return {"signal": signal.Signals(-returncode).name}
        return {"signal": -returncode}
    return {"exit_code": returncode}


class Supervisor:
    """Start, watch, restart and stop the worker processes; :meth:`run` returns the exit code.

    ``commands[i]`` and ``environments[i]`` (added to this process's environment)
    start worker i. ``cwd`` is every worker's working directory.
    """

    def __init__(
        self,
        commands: Sequence[Sequence[str]],
        environments: Sequence[Mapping[str, str]],
        *,
        cwd: Path | None = None,
        backoff: Backoff = Backoff(),
        grace_s: float = GRACE_S,
        tick_s: float = 0.1,
    ) -> None:
        if len(commands) != len(environments):
            raise ValueError("one environment per command")
        self._workers = [
            _Worker(index, list(command), dict(env))
            for index, (command, env) in enumerate(zip(commands, environments, strict=True))
        ]
        self._cwd = cwd
        self._backoff = backoff
        self._grace_s = grace_s
        self._tick_s = tick_s
        self._stop = threading.Event()
        self._stop_signal: str | None = None

    @property
    def pids(self) -> list[int | None]:
        """Each worker's current pid (None between a crash and its restart)."""
        return [w.proc.pid if w.proc and w.proc.poll() is None else None for w in self._workers]

    def stop(self) -> None:
        """Ask every worker to drain and stop (what SIGTERM does); any thread."""
        self._stop.set()

    def _on_signal(self, sig: signal.Signals) -> None:
        self._stop_signal = sig.name
        self._stop.set()

    def run(self, *, install_signal_handlers: bool = True) -> int:
        """Supervise until stopped, every worker finished, or a configuration error (2)."""
        from dedupe_consumer.signals import install_stop_handlers

        restore = install_stop_handlers(self._on_signal) if install_signal_handlers else None
        try:
            # Workers are started and signalled from this thread only: PR_SET_PDEATHSIG
            # fires when the *thread* that started a child ends.
            for worker in self._workers:
                self._start(worker)
            log.info("workers_started", workers=len(self._workers), pids=self.pids)
            config_error = False
            while not self._stop.is_set():
                config_error = self._reap()
                if config_error:
                    break
                if all(w.finished for w in self._workers):
                    log.info("workers_finished", workers=len(self._workers))
                    return 0
                self._restart_due()
                self._stop.wait(self._tick_s)
            return self._shutdown(config_error)
        finally:
            if restore is not None:
                restore()
            for worker in self._workers:  # never leave one behind, whatever raised
                if worker.proc is not None and worker.proc.poll() is None:
                    worker.proc.kill()
                    worker.proc.wait()

    def _start(self, worker: _Worker) -> None:
        worker.proc = subprocess.Popen(
            worker.command,
            env={**os.environ, **worker.env},
            cwd=self._cwd,
            # A group of its own: a terminal's Ctrl-C reaches the supervisor only, which
            # forwards one SIGTERM; the workers never see two signals for one stop.
            process_group=0,
        )
        worker.started_at = time.monotonic()
        worker.restart_at = None
        ports = {k.removeprefix("DEDUPE_").lower(): v for k, v in worker.env.items() if "PORT" in k}
        log.info(
            "worker_started",
            worker=worker.index,
            pid=worker.proc.pid,
            store=worker.env.get("DEDUPE_STORE__PATH"),
            **ports,
        )

    def _reap(self) -> bool:
        """Note the workers that exited and schedule restarts; True on a configuration error."""
        now = time.monotonic()
        for worker in self._workers:
            proc = worker.proc
            if proc is None or (code := proc.poll()) is None:
                continue
            worker.proc = None
            worker.exits.append(code)
            up_s = round(now - worker.started_at, 1)
            if code == 0:
                worker.finished = True
                log.warning(
                    "worker_finished", worker=worker.index, pid=proc.pid, up_s=up_s, restart=False
                )
                continue
            if code == CONFIG_ERROR_EXIT:
                log.error(
                    "worker_configuration_error",
                    worker=worker.index,
                    pid=proc.pid,
                    exit_code=code,
                    action="stopping all workers, exit 2 (see the worker's error line above)",
                )
                return True
            if now - worker.started_at >= self._backoff.reset_after_s:
                worker.failures = 0
            worker.failures += 1
            delay = self._backoff.delay(worker.failures)
            worker.restart_at = now + delay
            log.warning(
                "worker_restarting",
                worker=worker.index,
                pid=proc.pid,
                **_describe(code),
                up_s=up_s,
                failures=worker.failures,
                delay_s=delay,
            )
        return False

    def _restart_due(self) -> None:
        now = time.monotonic()
        for worker in self._workers:
            if worker.proc is None and worker.restart_at is not None and now >= worker.restart_at:
                self._start(worker)

    def _shutdown(self, config_error: bool) -> int:
        live = [w for w in self._workers if w.proc is not None]
        log.info(
            "workers_stopping",
            signal=self._stop_signal,
            reason="configuration error" if config_error else "stop requested",
            pids=[w.proc.pid for w in live if w.proc is not None],
            grace_s=self._grace_s,
        )
        for worker in live:
            assert worker.proc is not None
            with contextlib.suppress(ProcessLookupError):
                worker.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self._grace_s
        clean = True
        for worker in live:
            assert worker.proc is not None
            try:
                code = worker.proc.wait(timeout=max(deadline - time.monotonic(), 0.0))
            except subprocess.TimeoutExpired:
                worker.proc.kill()
                code = worker.proc.wait()
                log.error(
                    "worker_killed", worker=worker.index, pid=worker.proc.pid, grace_s=self._grace_s
                )
                clean = False
                continue
            # -SIGTERM: stopped before it installed its handlers, so before it consumed.
            if code not in (0, -signal.SIGTERM):
                clean = False
                log.error(
                    "worker_stop_failed",
                    worker=worker.index,
                    pid=worker.proc.pid,
                    **_describe(code),
                )
        if config_error:
            return CONFIG_ERROR_EXIT
        code = 0 if clean else 1
        log.info("workers_stopped", workers=len(self._workers), exit_code=code)
        return code


def supervise(
    command: Sequence[str], settings: Settings, count: int, kind: str, *, cwd: Path | None = None
) -> int:
    """Run ``count`` workers of ``command`` (``run`` or ``sidecar`` and its arguments) until
    stopped; returns the supervisor's exit code. Raises ConfigError before starting any."""
    envs = worker_environments(settings, count, kind)
    commands = worker_commands(command, count, os.getpid())
    return Supervisor(commands, envs, cwd=cwd).run()
