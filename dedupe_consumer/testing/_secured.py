"""A secured test broker: SASL_SSL (SCRAM-SHA-512 over TLS) with ACLs, made per run.

:class:`SecuredKafka` is a :class:`~dedupe_consumer.testing.LocalKafka` with one
more listener, ``SASL_SSL``, whose certificate is signed by a certificate
authority made for this run with the ``openssl`` command (nothing is kept or
reused), and the ``StandardAuthorizer``: without an ACL, a user may do nothing.
The plaintext listener stays loopback-only as the broker's internal listener;
its ``User:ANONYMOUS`` and the ``admin`` SCRAM user are super users.

SCRAM users are created with ``AdminClient.alter_user_scram_credentials`` and
rights with ``AdminClient.create_acls``; every password is random per run and
never logged (a :class:`ScramUser`'s ``repr`` hides it).
"""

from __future__ import annotations

import atexit
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Self

from confluent_kafka import KafkaException
from confluent_kafka.admin import (  # type: ignore[attr-defined]  # public, not in __all__
    AclBinding,
    AclBindingFilter,
    AclOperation,
    AclPermissionType,
    AdminClient,
    ResourcePatternType,
    ResourceType,
    ScramCredentialInfo,
    ScramMechanism,
    UserScramCredentialUpsertion,
)

from dedupe_consumer.kafka.logs import kafka_log_config
from dedupe_consumer.testing._errors import BrokerUnavailableError, output_tail
from dedupe_consumer.testing._local_kafka import LocalKafka

__all__ = ["Acl", "ScramUser", "SecuredKafka", "make_test_ca"]

LISTENER: Final = "SASL_SSL"
MECHANISM: Final = "SCRAM-SHA-512"
ADMIN_USER: Final = "admin"


@dataclass(frozen=True)
class ScramUser:
    """A SCRAM-SHA-512 user of the secured broker; ``repr`` never shows the password."""

    name: str
    password: str = field(repr=False)

    @property
    def principal(self) -> str:
        return f"User:{self.name}"


@dataclass(frozen=True)
class Acl:
    """One ALLOW rule: ``operation`` on ``resource_type`` ``name`` (``pattern``) for a user."""

    resource_type: ResourceType
    name: str
    operation: AclOperation
    pattern: ResourcePatternType = ResourcePatternType.LITERAL

    def binding(self, principal: str) -> AclBinding:
        return AclBinding(
            self.resource_type,
            self.name,
            self.pattern,
            principal,
            "*",
            self.operation,
            AclPermissionType.ALLOW,
        )

    def filter(self, principal: str) -> AclBindingFilter:
        return AclBindingFilter(
            self.resource_type,
            self.name,
            self.pattern,
            principal,
            "*",
            self.operation,
            AclPermissionType.ALLOW,
        )


@dataclass(frozen=True)
class TlsFiles:
    """The run's certificate authority and the broker's PEM keystore (key + chain)."""

    ca: Path
    keystore: Path


def _openssl(*args: str, cwd: Path) -> None:
    result = subprocess.run(
        ["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )
    if result.returncode != 0:
        raise BrokerUnavailableError(
            f"openssl {args[0]} failed (exit {result.returncode}):\n"
            f"{output_tail(result.stdout + result.stderr)}"
        )


def make_test_ca(directory: Path, host: str = "127.0.0.1") -> TlsFiles:
    """A self-signed CA and a broker certificate for ``host`` (IP and DNS SAN), in PEM.

    EC P-256 keys (quick to make), valid for two days; the broker's key is
    PKCS#8 and unencrypted, as Kafka's ``ssl.keystore.type=PEM`` reads it.
    """
    if shutil.which("openssl") is None:
        raise BrokerUnavailableError("the openssl command is not on PATH (needed for test TLS)")
    directory.mkdir(parents=True, exist_ok=True)
    curve = ("-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256")
    _openssl("genpkey", *curve, "-out", "ca.key", cwd=directory)
    _openssl(
        "req", "-x509", "-new", "-key", "ca.key", "-sha256", "-days", "2",
        "-subj", "/CN=dedupe-consumer test CA", "-out", "ca.pem", cwd=directory,
    )  # fmt: skip
    _openssl("genpkey", *curve, "-out", "broker.key", cwd=directory)
    _openssl(
        "req", "-new", "-key", "broker.key", "-subj", f"/CN={host}", "-out", "broker.csr",
        cwd=directory,
    )  # fmt: skip
    (directory / "broker.ext").write_text(
        f"subjectAltName=IP:{host},DNS:localhost\nextendedKeyUsage=serverAuth\n",
        encoding="utf-8",
    )
    _openssl(
        "x509", "-req", "-in", "broker.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
        "-CAcreateserial", "-days", "2", "-sha256", "-extfile", "broker.ext",
        "-out", "broker.pem", cwd=directory,
    )  # fmt: skip
    keystore = directory / "broker-keystore.pem"
    keystore.write_text(
        "".join((directory / name).read_text("utf-8") for name in ("broker.key", "broker.pem")),
        encoding="utf-8",
    )
    return TlsFiles(ca=directory / "ca.pem", keystore=keystore)


class SecuredKafka:
    """A one-node broker with a SASL_SSL listener (SCRAM-SHA-512 over TLS) and ACLs.

    ``start()`` makes the CA and certificate, starts the broker and creates the
    ``admin`` user (a super user); :meth:`add_user` makes more, :meth:`grant` and
    :meth:`revoke` change their rights. :meth:`client_config` is what a client
    of a user sets; :attr:`ca_file` is the CA to trust.
    """

    def __init__(self, *, startup_timeout: float = 120.0) -> None:
        self._tls_dir: Path | None = None
        self._startup_timeout = startup_timeout
        self._tls: TlsFiles | None = None
        self._broker: LocalKafka | None = None
        self._internal: Any = None
        self.admin_user = ScramUser(ADMIN_USER, secrets.token_urlsafe(24))

    @property
    def broker(self) -> LocalKafka:
        if self._broker is None:
            raise RuntimeError("SecuredKafka has not been started")
        return self._broker

    @property
    def bootstrap_servers(self) -> str:
        """The SASL_SSL listener's address."""
        return self.broker.listener_address(LISTENER)

    @property
    def ca_file(self) -> Path:
        if self._tls is None:
            raise RuntimeError("SecuredKafka has not been started")
        return self._tls.ca

    def start(self) -> Self:
        self._tls_dir = Path(tempfile.mkdtemp(prefix="dedupe-tls-"))
        atexit.register(self.stop)  # the keys go with a run that never calls stop()
        try:
            self._tls = make_test_ca(self._tls_dir)
        except BaseException:
            self.stop()
            raise
        prefix = f"listener.name.{LISTENER.lower()}"
        self._broker = LocalKafka(
            startup_timeout=self._startup_timeout,
            extra_listeners={LISTENER: "SASL_SSL"},
            extra_properties={
                "sasl.enabled.mechanisms": MECHANISM,
                f"{prefix}.{MECHANISM.lower()}.sasl.jaas.config": (
                    "org.apache.kafka.common.security.scram.ScramLoginModule required;"
                ),
                f"{prefix}.ssl.keystore.type": "PEM",
                f"{prefix}.ssl.keystore.location": str(self._tls.keystore),
                "authorizer.class.name": (
                    "org.apache.kafka.metadata.authorizer.StandardAuthorizer"
                ),
                # The internal listeners (plaintext, controller) and the admin user.
                "super.users": f"User:ANONYMOUS;{self.admin_user.principal}",
            },
        )
        try:
            self._broker.start()
            self._internal = AdminClient(
                {"bootstrap.servers": self._broker.bootstrap_servers, **kafka_log_config()}
            )
            self._upsert([self.admin_user])
            self._wait_for_login(self.admin_user)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        atexit.unregister(self.stop)
        self._internal = None
        if self._broker is not None:
            self._broker.stop()  # its atexit hook covers a test run that never calls stop()
        if self._tls_dir is not None:
            shutil.rmtree(self._tls_dir, ignore_errors=True)
            self._tls_dir = None
            self._tls = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def client_config(self, user: ScramUser | None = None) -> dict[str, str]:
        """librdkafka properties of a client of ``user`` (the admin by default)."""
        user = user or self.admin_user
        return {
            "bootstrap.servers": self.bootstrap_servers,
            "security.protocol": "SASL_SSL",
            "sasl.mechanism": MECHANISM,
            "sasl.username": user.name,
            "sasl.password": user.password,
            "ssl.ca.location": str(self.ca_file),
        }

    def admin(self, user: ScramUser | None = None) -> Any:
        """An AdminClient of ``user`` (the admin by default) over SASL_SSL."""
        return AdminClient({**self.client_config(user), **kafka_log_config()})

    def add_user(self, name: str) -> ScramUser:
        """A new SCRAM-SHA-512 user with a random password and no rights."""
        user = ScramUser(name, secrets.token_urlsafe(24))
        self._upsert([user])
        self._wait_for_login(user)
        return user

    def _upsert(self, users: Iterable[ScramUser]) -> None:
        info = ScramCredentialInfo(ScramMechanism.SCRAM_SHA_512, 4096)
        upserts = [UserScramCredentialUpsertion(u.name, info, u.password.encode()) for u in users]
        for future in self._internal.alter_user_scram_credentials(upserts).values():
            future.result()

    def _wait_for_login(self, user: ScramUser, timeout: float = 30.0) -> None:
        """Until the SASL_SSL listener accepts ``user`` (credentials reach it via metadata)."""
        deadline = time.monotonic() + timeout
        admin = self.admin(user)
        last = ""
        while time.monotonic() < deadline:
            try:
                admin.describe_cluster(request_timeout=5).result(timeout=6)
                return
            except KafkaException as exc:
                last = str(exc.args[0].str() if exc.args else exc)
                time.sleep(0.2)
        raise BrokerUnavailableError(
            f"user {user.name!r} could not log in over SASL_SSL within {timeout:.0f} s: {last}"
        )

    def grant(self, user: ScramUser, acls: Iterable[Acl]) -> None:
        bindings = [acl.binding(user.principal) for acl in acls]
        for future in self._internal.create_acls(bindings).values():
            future.result()

    def revoke(self, user: ScramUser, acls: Iterable[Acl]) -> None:
        filters = [acl.filter(user.principal) for acl in acls]
        for future in self._internal.delete_acls(filters).values():
            future.result()
