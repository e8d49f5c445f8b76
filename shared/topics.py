"""Topic names of DESIGN §2 and their parser.

```
spececd/v1/{device}/open              edge -> pool (workers share OPEN_SHARED_FILTER)
spececd/v1/{device}/{sid}/up          edge -> owner: drafts, decode, close
spececd/v1/{device}/{sid}/down        owner -> edge: opened, verdicts, tokens, errors
spececd/v1/workers/{worker}/status    retained "online"; Last Will "offline"
```

``{device}`` is the MQTT username of the edge device; the broker's ACL makes sure a device only
writes its own ``open``/``up`` topics, so a worker takes the device from the topic (``parse_topic``),
never from the payload. Names are 1..64 characters of ``[A-Za-z0-9_.-]`` (never the MQTT wildcards
``+`` ``#`` or the separator ``/``); a session id is 1..64 characters of ``[A-Za-z0-9_-]`` (the
protocol's rule). ``workers`` is reserved and cannot be a device name, so the status topics never
collide with a device's.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from shared.errors import ProtocolError

PREFIX = "spececd/v1"
WORKER_GROUP = "spececd-workers"
RESERVED_DEVICE = "workers"

OPEN_FILTER = f"{PREFIX}/+/open"
OPEN_SHARED_FILTER = f"$share/{WORKER_GROUP}/{OPEN_FILTER}"
UP_FILTER = f"{PREFIX}/+/+/up"
DOWN_FILTER = f"{PREFIX}/+/+/down"
STATUS_FILTER = f"{PREFIX}/{RESERVED_DEVICE}/+/status"
ALL_FILTER = "spececd/#"

ONLINE = b"online"
OFFLINE = b"offline"
LOADING = b"loading"  # connected, model still loading: not available (edges treat it as offline)

_NAME_RE = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
_SID_RE = re.compile(r"[A-Za-z0-9_\-]{1,64}")


@dataclass(frozen=True)
class ParsedTopic:
    """A SpecECD topic taken apart.

    ``kind`` is ``"open"``, ``"up"``, ``"down"`` or ``"status"``. ``device`` is set for the first
    three, ``sid`` for ``up``/``down``, ``worker`` for ``status``.
    """

    kind: str
    device: str | None = None
    sid: str | None = None
    worker: str | None = None


def check_device(device: str) -> str:
    """Return ``device`` if it is a valid device name (the device's MQTT username), else raise."""
    _check(device, "device", _NAME_RE, "1..64 characters of A-Z a-z 0-9 _ . -")
    if device == RESERVED_DEVICE:
        raise ProtocolError("topic", f"device name {RESERVED_DEVICE!r} is reserved; choose another username")
    return device


def check_worker(worker: str) -> str:
    """Return ``worker`` if it is a valid worker name (the worker's MQTT username), else raise."""
    return _check(worker, "worker", _NAME_RE, "1..64 characters of A-Z a-z 0-9 _ . -")


def check_sid(sid: str) -> str:
    """Return ``sid`` if it is a valid session id, else raise ``ProtocolError``."""
    return _check(sid, "sid", _SID_RE, "1..64 characters of A-Z a-z 0-9 _ -")


def _check(value: object, what: str, pattern: re.Pattern[str], allowed: str) -> str:
    if not isinstance(value, str) or pattern.fullmatch(value) is None:
        raise ProtocolError("topic", f"invalid {what} name {value!r}: use {allowed}")
    return value


def open_topic(device: str) -> str:
    """Where ``device`` publishes session opens (read by the worker pool's shared subscription)."""
    return f"{PREFIX}/{check_device(device)}/open"


def up_topic(device: str, sid: str) -> str:
    """Where ``device`` publishes the requests of session ``sid`` to its owner."""
    return f"{PREFIX}/{check_device(device)}/{check_sid(sid)}/up"


def down_topic(device: str, sid: str) -> str:
    """Where the owner of session ``sid`` answers ``device``."""
    return f"{PREFIX}/{check_device(device)}/{check_sid(sid)}/down"


def status_topic(worker: str) -> str:
    """The retained online/offline status of ``worker``."""
    return f"{PREFIX}/{RESERVED_DEVICE}/{check_worker(worker)}/status"


def parse_topic(topic: str) -> ParsedTopic:
    """Take a concrete SpecECD topic apart; raise ``ProtocolError("topic", ...)`` for anything else."""
    if not isinstance(topic, str):
        raise ProtocolError("topic", f"topic must be a string, got {type(topic).__name__}")
    parts = topic.split("/")
    if len(parts) < 4 or "/".join(parts[:2]) != PREFIX:
        raise ProtocolError("topic", f"{topic!r} is not a {PREFIX}/... topic")
    rest = parts[2:]
    if len(rest) == 2 and rest[1] == "open":
        return ParsedTopic("open", device=check_device(rest[0]))
    if len(rest) == 3 and rest[0] == RESERVED_DEVICE and rest[2] == "status":
        return ParsedTopic("status", worker=check_worker(rest[1]))
    if len(rest) == 3 and rest[2] in ("up", "down"):
        return ParsedTopic(rest[2], device=check_device(rest[0]), sid=check_sid(rest[1]))
    raise ProtocolError(
        "topic", f"{topic!r} is not one of {PREFIX}/DEVICE/open, .../DEVICE/SID/up|down, .../workers/W/status"
    )
