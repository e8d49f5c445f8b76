"""The one small exception hierarchy of SpecECD.

Every error carries the fields a caller needs to react, and its message says what to do next.
Library errors are wrapped at the boundary with ``raise ... from exc``.
"""

from __future__ import annotations


class SpecECDError(Exception):
    """Base class of every error SpecECD raises on purpose."""


class ProtocolError(SpecECDError):
    """A message could not be decoded or failed validation. ``field`` names the offending field."""

    def __init__(self, field: str, detail: str) -> None:
        self.field = field
        self.detail = detail
        super().__init__(f"invalid message field {field!r}: {detail}")


class ModelLoadError(SpecECDError):
    """A model or tokenizer could not be loaded. ``tried`` lists what was attempted, ``hint`` what to do."""

    def __init__(self, spec: str, tried: list[str], hint: str) -> None:
        self.spec = spec
        self.tried = list(tried)
        self.hint = hint
        tried_txt = "; ".join(self.tried) if self.tried else "nothing"
        super().__init__(f"cannot load model {spec!r} (tried: {tried_txt}). {hint}")


class TokenizerMismatchError(ModelLoadError):
    """Draft and target do not share a tokenizer, so draft token ids mean nothing to the target."""


class SessionError(SpecECDError):
    """A session-level failure reported by a verifier. ``code`` is one of the protocol error codes."""

    def __init__(self, code: str, detail: str, *, sid: str | None = None) -> None:
        self.code = code
        self.detail = detail
        self.sid = sid
        super().__init__(f"session {sid or '?'}: {code}: {detail}")


class BrokerError(SpecECDError):
    """The MQTT broker is unreachable, refused us, or the link broke."""


class BrokerAuthError(BrokerError):
    """The broker refused our credentials or client id (bad username/password, not authorized)."""


class CloudUnavailableError(SpecECDError):
    """No worker answered in time and the fallback policy is ``fail``."""


class ConfigError(SpecECDError):
    """A configuration key has an invalid value. Names the key, the value and what is allowed."""

    def __init__(self, key: str, value: object, allowed: str) -> None:
        self.key = key
        self.value = value
        self.allowed = allowed
        super().__init__(f"config key {key!r} has invalid value {value!r}: allowed {allowed}")
