"""Where the broker is and how to log in, and what a received message carries: the plain data
of ``shared/mqtt.py`` (split off to keep that module small; it re-exports every name here, and
this module does not import paho)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.errors import BrokerError


@dataclass(frozen=True)
class TLSConfig:
    """TLS to the broker: the CA that signed its certificate, optional client certificate."""

    ca_file: str
    cert_file: str | None = None
    key_file: str | None = None
    insecure: bool = False  # skip the host name check (never in production)


@dataclass(frozen=True)
class BrokerConfig:
    """Where the broker is and how to log in."""

    host: str = "127.0.0.1"
    port: int = 1883
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: TLSConfig | None = None
    keepalive: int = 30

    @classmethod
    def parse_hostport(cls, hostport: str, **kwargs: object) -> BrokerConfig:
        """``"host:port"`` (or ``"host"``, port 1883, 8883 with ``tls``) plus any other field."""
        from shared.config_keys import BadValue, parse_hostport  # the project's one host:port parser

        try:
            host, port = parse_hostport(hostport, default_port=8883 if kwargs.get("tls") else 1883)
        except BadValue as bad:
            raise BrokerError(f"invalid broker address {hostport!r}: write {bad}") from None
        return cls(host=host, port=port, **kwargs)  # type: ignore[arg-type]

    @property
    def address(self) -> str:
        """``host:port`` for messages."""
        return f"{self.host}:{self.port}"


def read_password_file(path: str | Path) -> str:
    """The password stored in ``path`` (first line, surrounding whitespace removed)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise BrokerError(f"cannot read the password file {str(path)!r}: {exc.strerror}") from exc
    password = text.splitlines()[0].strip() if text.strip() else ""
    if not password:
        raise BrokerError(f"password file {str(path)!r} is empty: put the MQTT password on its first line")
    return password


@dataclass(frozen=True)
class Will:
    """The Last Will the broker publishes if the connection dies without a clean DISCONNECT."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = False


@dataclass(frozen=True)
class Incoming:
    """One received message, with its MQTT 5 properties (None when absent)."""

    topic: str
    payload: bytes
    response_topic: str | None
    correlation_data: bytes | None
    content_type: str | None
    message_expiry: int | None
    retain: bool
    received_at: float  # time.perf_counter() on arrival


Handler = Callable[[Incoming], None]


def broker_config_from_settings(settings: Any) -> BrokerConfig:
    """A ``BrokerConfig`` from ``shared.config.BrokerSettings`` (password from the secret or its file)."""
    password = settings.password.reveal() if settings.password is not None else None
    if password is None and settings.password_file:
        password = read_password_file(settings.password_file)
    tls = None
    if settings.tls:
        tls = TLSConfig(
            ca_file=settings.tls_ca,
            cert_file=settings.tls_cert,
            key_file=settings.tls_key,
            insecure=settings.tls_insecure,
        )
    return BrokerConfig(
        host=settings.host,
        port=settings.port,
        username=settings.username,
        password=password,
        tls=tls,
        keepalive=settings.keepalive,
    )
