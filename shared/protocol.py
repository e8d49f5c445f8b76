"""The SpecECD wire protocol, version 1 (DESIGN §3, ARCHITECTURE "Messages"): sans-io.

Frozen dataclasses validate themselves in ``__post_init__``; :func:`encode` turns one into the
bytes of an MQTT payload and :func:`decode` turns bytes back into one. Nothing here touches a
socket. Every failure is a :class:`~shared.errors.ProtocolError` whose ``field`` names the
offending field (``"payload"`` for the envelope, ``"v"`` / ``"t"`` for version and type).

Wire format: one definite-length CBOR map per payload with short text keys, ``"v": 1`` and
``"t"`` (the message type). Token id lists (``ctx``, ``tok``, q ``ids``) travel as RFC 8746
typed arrays, tag 70 (uint32 little-endian); q weights as tag 69 (uint16 little-endian).
``Verdict`` and ``Tokens`` carry their timings in a nested ``"timings"`` map
(``verify_ms``, ``queue_ms``); ``sampling`` is a nested map (``temperature``, ``top_k``,
``top_p``, ``seed``). Optional fields (``Draft.q``, ``Error.seq``, ``Error.epoch``, ``batch``,
``batch_pos`` and ``pos_ms`` of ``Verdict`` / ``Tokens``, ``Verdict.row_med``) are left
out of the map when ``None``, never sent as null. Encoding is canonical (sorted keys, shortest
floats), so equal messages give equal bytes.

Decoding is strict: the size cap is checked before any parsing; nesting is capped at
``MAX_DEPTH``; indefinite lengths, duplicate keys, non-text keys, trailing bytes, tags other
than 69/70 where they belong, unknown ``t``, a wrong ``v``, missing fields, wrongly typed fields
and unknown extra keys are all rejected.
"""

from __future__ import annotations

import io
import math
import re
import struct
from dataclasses import dataclass
from typing import Any, ClassVar, Final, TypeAlias

import cbor2

from shared.errors import ProtocolError
from shared.sampling import SamplingParams, SparseDist

PROTOCOL_VERSION: Final = 1
MAX_PAYLOAD_BYTES: Final = 1 << 20
MAX_DEPTH: Final = 6  # deepest legitimate nesting: map > q array > dist map > typed-array tag
CONTENT_TYPE: Final = "application/cbor"
MAX_GAMMA: Final = 64  # most draft tokens in one round
ID_LIMIT: Final = 2**32  # token ids are uint32: [0, ID_LIMIT)
COUNT_LIMIT: Final = 2**31  # epoch, seq, pos, n, max_new, part, n_acc: [0, COUNT_LIMIT)
MAX_NAME_CHARS: Final = 1024  # model names (hub ids, paths)
MAX_DETAIL_CHARS: Final = 4096
ERROR_CODES: Final = frozenset(
    {"bad_message", "resync", "overloaded", "model_mismatch", "stale_epoch", "internal", "limit"}
)
MODES: Final = frozenset({"speculative", "cloud"})

TAG_UINT16_LE: Final = 69  # RFC 8746 typed array, uint16 little-endian
TAG_UINT32_LE: Final = 70  # RFC 8746 typed array, uint32 little-endian

_SID_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
_WORKER_RE = re.compile(r"[^/+#\x00-\x1f\x7f]{1,128}")  # must be usable as one MQTT topic level


# --- field validation (raise ProtocolError naming the field) ---------------------------------


def _count(field: str, x: object, *, limit: int = COUNT_LIMIT) -> None:
    if type(x) is not int or not 0 <= x < limit:  # not bool, not numpy/torch scalars
        raise ProtocolError(field, f"must be an int in [0, {limit}), got {x!r}")


def _counts(obj: object, *fields: str) -> None:
    for field in fields:
        _count(field, getattr(obj, field))


def _one_of(field: str, x: object, allowed: frozenset[str]) -> None:
    if not isinstance(x, str) or x not in allowed:
        raise ProtocolError(field, f"must be one of {sorted(allowed)}, got {x!r:.80}")


def _sid(field: str, x: object) -> None:
    if not isinstance(x, str) or _SID_RE.fullmatch(x) is None:
        raise ProtocolError(field, f"must be 1-64 characters of [A-Za-z0-9_-], got {x!r}")


def _text(field: str, x: object, max_chars: int) -> None:
    if not isinstance(x, str) or len(x) > max_chars:
        raise ProtocolError(field, f"must be a str of at most {max_chars} characters, got {x!r:.80}")


def _flag(field: str, x: object) -> None:
    if not isinstance(x, bool):
        raise ProtocolError(field, f"must be a bool, got {x!r}")


def _nonneg_float(obj: object, field: str) -> None:
    """Check a finite float >= 0 (an int is accepted) and store it as float."""
    x = getattr(obj, field)
    if isinstance(x, bool) or not isinstance(x, int | float) or not math.isfinite(x) or x < 0:
        raise ProtocolError(field, f"must be a finite number >= 0, got {x!r}")
    object.__setattr__(obj, field, float(x))


def _ids(obj: object, field: str, *, min_len: int, max_len: int | None = None) -> None:
    """Check a sequence of uint32 token ids (a list is accepted) and store it as a tuple."""
    x = getattr(obj, field)
    if not isinstance(x, tuple | list):
        raise ProtocolError(field, f"must be a tuple of ints, got {type(x).__name__} (use .tolist())")
    if not all(type(i) is int for i in x):
        raise ProtocolError(field, "token ids must be plain ints (convert tensors with .tolist())")
    if x and (min(x) < 0 or max(x) >= ID_LIMIT):
        raise ProtocolError(field, f"token ids must be in [0, 2**32), got min {min(x)}, max {max(x)}")
    if len(x) < min_len or (max_len is not None and len(x) > max_len):
        raise ProtocolError(field, f"length must be in [{min_len}, {max_len or 'inf'}], got {len(x)}")
    if type(x) is not tuple:
        object.__setattr__(obj, field, tuple(x))


def _batch_fields(obj: object) -> None:
    for field in ("batch", "batch_pos"):
        if getattr(obj, field) is not None:
            _count(field, getattr(obj, field))
    if obj.pos_ms is not None:  # type: ignore[attr-defined]
        _nonneg_float(obj, "pos_ms")


# --- messages --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Open:
    """edge → pool: open (or re-open with a higher epoch) a session over the committed ``ctx``."""

    T: ClassVar[str] = "open"
    sid: str
    epoch: int
    ctx: tuple[int, ...]  # all committed token ids, at least one
    sampling: SamplingParams
    draft_model: str
    target_model: str
    max_new: int
    mode: str = "speculative"

    def __post_init__(self) -> None:
        _sid("sid", self.sid)
        _counts(self, "epoch", "max_new")
        _ids(self, "ctx", min_len=1)
        if not isinstance(self.sampling, SamplingParams):
            raise ProtocolError("sampling", f"must be a SamplingParams, got {type(self.sampling).__name__}")
        _text("draft_model", self.draft_model, MAX_NAME_CHARS)
        _text("target_model", self.target_model, MAX_NAME_CHARS)
        _one_of("mode", self.mode, MODES)


@dataclass(frozen=True, slots=True, kw_only=True)
class Opened:
    """owner → edge: the session is prefilled up to ``pos`` tokens and owned by ``worker``."""

    T: ClassVar[str] = "opened"
    sid: str
    epoch: int
    worker: str
    pos: int

    def __post_init__(self) -> None:
        _sid("sid", self.sid)
        _counts(self, "epoch", "pos")
        if not isinstance(self.worker, str) or _WORKER_RE.fullmatch(self.worker) is None:
            raise ProtocolError(
                "worker", f"must be 1-128 characters without / + # or controls, got {self.worker!r}"
            )


@dataclass(frozen=True, slots=True, kw_only=True)
class Draft:
    """edge → owner: γ = len(tok) draft tokens starting at absolute position ``pos``.

    ``q`` holds the sparse draft distribution of each position (None when greedy); each draft
    token must lie in the support of its q, since it was sampled from it.
    """

    T: ClassVar[str] = "draft"
    sid: str
    epoch: int
    seq: int
    pos: int
    tok: tuple[int, ...]
    q: tuple[SparseDist, ...] | None = None

    def __post_init__(self) -> None:
        _sid("sid", self.sid)
        _counts(self, "epoch", "seq", "pos")
        _ids(self, "tok", min_len=1, max_len=MAX_GAMMA)
        if self.q is None:
            return
        q = self.q
        if not isinstance(q, tuple | list) or not all(isinstance(d, SparseDist) for d in q):
            raise ProtocolError("q", "must be None or a tuple of SparseDist, one per draft token")
        if len(q) != len(self.tok):
            raise ProtocolError("q", f"has {len(q)} distributions for {len(self.tok)} draft tokens")
        for i, (x, dist) in enumerate(zip(self.tok, q, strict=True)):
            if x not in dist.ids:
                raise ProtocolError("q", f"draft token {x} at index {i} is not in the support of q[{i}]")
        if type(q) is not tuple:
            object.__setattr__(self, "q", tuple(q))


@dataclass(frozen=True, slots=True, kw_only=True)
class Verdict:
    """owner → edge: keep ``n_acc`` draft tokens, then ``next`` (the correction or bonus token).

    ``alpha`` holds the theoretical acceptance Σ min(p, q) of each judged position (may be empty).
    ``batch`` / ``batch_pos``: the sessions and positions of the target forward this verdict came
    from; ``pos_ms``: what one more (padded) position costs a forward of this worker, in ms, fitted
    over its recent forwards; ``row_med``: the fleet's typical row (a block's positions, γ + 1),
    the median of the latest draft rows of the devices this worker verified lately, from a
    worker that pads its forwards (optional, each: None when the worker does not say; left off
    the wire then).
    """

    T: ClassVar[str] = "verdict"
    sid: str
    epoch: int
    seq: int
    n_acc: int
    next: int
    eos: bool
    verify_ms: float
    queue_ms: float
    alpha: tuple[float, ...] = ()
    batch: int | None = None
    batch_pos: int | None = None
    pos_ms: float | None = None
    row_med: int | None = None

    def __post_init__(self) -> None:
        _batch_fields(self)
        if self.row_med is not None:
            _count("row_med", self.row_med, limit=MAX_GAMMA + 2)
        _sid("sid", self.sid)
        _counts(self, "epoch", "seq")
        _count("n_acc", self.n_acc, limit=MAX_GAMMA + 1)
        _count("next", self.next, limit=ID_LIMIT)
        _flag("eos", self.eos)
        _nonneg_float(self, "verify_ms")
        _nonneg_float(self, "queue_ms")
        a = self.alpha
        if not isinstance(a, tuple | list) or len(a) > MAX_GAMMA + 1:
            raise ProtocolError("alpha", f"must be a tuple of at most {MAX_GAMMA + 1} floats")
        if not all(not isinstance(x, bool) and isinstance(x, int | float) and 0 <= x < math.inf for x in a):
            raise ProtocolError("alpha", f"entries must be finite numbers >= 0, got {a!r:.80}")
        if not all(type(x) is float for x in a) or type(a) is not tuple:
            object.__setattr__(self, "alpha", tuple(float(x) for x in a))


@dataclass(frozen=True, slots=True, kw_only=True)
class Decode:
    """edge → owner (cloud-only mode): decode up to ``n`` tokens from ``pos`` with the target alone."""

    T: ClassVar[str] = "decode"
    sid: str
    epoch: int
    seq: int
    pos: int
    n: int

    def __post_init__(self) -> None:
        _sid("sid", self.sid)
        _counts(self, "epoch", "seq", "pos", "n")


@dataclass(frozen=True, slots=True, kw_only=True)
class Tokens:
    """owner → edge: part ``part`` of the streamed answer to a ``Decode``; ``done`` on the last."""

    T: ClassVar[str] = "tokens"
    sid: str
    epoch: int
    seq: int
    part: int
    tok: tuple[int, ...]
    done: bool
    eos: bool
    verify_ms: float
    queue_ms: float
    batch: int | None = None  # as in Verdict
    batch_pos: int | None = None
    pos_ms: float | None = None

    def __post_init__(self) -> None:
        _batch_fields(self)
        _sid("sid", self.sid)
        _counts(self, "epoch", "seq", "part")
        _ids(self, "tok", min_len=0)
        _flag("done", self.done)
        _flag("eos", self.eos)
        _nonneg_float(self, "verify_ms")
        _nonneg_float(self, "queue_ms")


@dataclass(frozen=True, slots=True, kw_only=True)
class Close:
    """edge → owner: the session is over; the owner frees its KV cache."""

    T: ClassVar[str] = "close"
    sid: str
    epoch: int

    def __post_init__(self) -> None:
        _sid("sid", self.sid)
        _count("epoch", self.epoch)


@dataclass(frozen=True, slots=True, kw_only=True)
class Error:
    """owner → edge: a request failed; ``code`` (one of ``ERROR_CODES``) says how to react."""

    T: ClassVar[str] = "error"
    sid: str
    code: str
    detail: str
    seq: int | None = None
    epoch: int | None = None

    def __post_init__(self) -> None:
        _sid("sid", self.sid)
        _one_of("code", self.code, ERROR_CODES)
        _text("detail", self.detail, MAX_DETAIL_CHARS)
        if self.seq is not None:
            _count("seq", self.seq)
        if self.epoch is not None:
            _count("epoch", self.epoch)


Message: TypeAlias = Open | Opened | Draft | Verdict | Decode | Tokens | Close | Error


# --- codec -----------------------------------------------------------------------------------

_S, _U, _B, _N, _IDS = "str", "uint", "bool", "number", "ids"
# wire key -> kind, per message type; "timings" carries verify_ms and queue_ms.
_SCHEMA: Final[dict[type, dict[str, str]]] = {
    Open: {"sid": _S, "epoch": _U, "ctx": _IDS, "sampling": "sampling", "draft_model": _S,
           "target_model": _S, "max_new": _U, "mode": _S},
    Opened: {"sid": _S, "epoch": _U, "worker": _S, "pos": _U},
    Draft: {"sid": _S, "epoch": _U, "seq": _U, "pos": _U, "tok": _IDS, "q": "q"},
    Verdict: {"sid": _S, "epoch": _U, "seq": _U, "n_acc": _U, "next": _U, "eos": _B,
              "timings": "timings", "alpha": "floats", "batch": _U, "batch_pos": _U, "pos_ms": _N,
              "row_med": _U},
    Decode: {"sid": _S, "epoch": _U, "seq": _U, "pos": _U, "n": _U},
    Tokens: {"sid": _S, "epoch": _U, "seq": _U, "part": _U, "tok": _IDS, "done": _B, "eos": _B,
             "timings": "timings", "batch": _U, "batch_pos": _U, "pos_ms": _N},
    Close: {"sid": _S, "epoch": _U},
    Error: {"sid": _S, "code": _S, "detail": _S, "seq": _U, "epoch": _U},
}  # fmt: skip
_PLAIN: Final[dict[str, type]] = {_S: str, _U: int, _B: bool}
# optional fields: left off the wire when None
_OPTIONAL: Final = frozenset({(Draft, "q"), (Error, "seq"), (Error, "epoch"), (Verdict, "batch"),
                              (Verdict, "batch_pos"), (Verdict, "pos_ms"), (Verdict, "row_med"), (Tokens, "batch"),
                              (Tokens, "batch_pos"), (Tokens, "pos_ms")})  # fmt: skip
_BY_T: Final[dict[str, type]] = {cls.T: cls for cls in _SCHEMA}
_SAMPLING_KEYS: Final = ("temperature", "top_k", "top_p", "seed")
_TIMING_KEYS: Final = ("verify_ms", "queue_ms")
# cbor2's built-in semantic tags (dates, bignums, shared references, sets, ...) are refused:
# a valid payload carries no tag but 69/70, and an unknown tag decodes to CBORTag, which no
# field accepts.
_BUILTIN_TAGS: Final = (0, 1, 2, 3, 4, 5, 21, 22, 23, 24, 25, 28, 29, 30, 32, 33, 34, 35, 36, 37,
                        52, 54, 100, 256, 258, 260, 261, 1004, 55799)  # fmt: skip


def _refuse_tag(*args: object) -> None:  # also fits the shareable (28) initializer signature
    raise ValueError("semantic tag not allowed in a SpecECD payload")


_SEMANTIC: Final = {tag: _refuse_tag for tag in _BUILTIN_TAGS}


def _typed(tag: int, values: tuple[int, ...]) -> cbor2.CBORTag:
    return cbor2.CBORTag(tag, struct.pack(f"<{len(values)}{'I' if tag == TAG_UINT32_LE else 'H'}", *values))


def _encode_value(kind: str, value: Any, msg: Any) -> Any:
    if kind == _IDS:
        return _typed(TAG_UINT32_LE, value)
    if kind == "q":
        return [{"ids": _typed(TAG_UINT32_LE, d.ids), "w": _typed(TAG_UINT16_LE, d.w)} for d in value]
    if kind == "sampling":
        return {"temperature": float(value.temperature), "top_k": value.top_k,
                "top_p": float(value.top_p), "seed": value.seed}  # fmt: skip
    if kind == "timings":
        return {"verify_ms": msg.verify_ms, "queue_ms": msg.queue_ms}
    if kind == "floats":
        return list(value)
    if kind == _N:
        return float(value)
    return value


def encode(msg: Message) -> bytes:
    """Encode a message as one canonical CBOR map: the MQTT payload (Content-Type CONTENT_TYPE).

    Raises ProtocolError("payload", ...) for a non-message or an encoding over MAX_PAYLOAD_BYTES.
    """
    schema = _SCHEMA.get(type(msg))
    if schema is None:
        raise ProtocolError("payload", f"cannot encode {type(msg).__name__}: not a protocol message")
    wire: dict[str, Any] = {"v": PROTOCOL_VERSION, "t": msg.T}
    for key, kind in schema.items():
        value = None if kind == "timings" else getattr(msg, key)
        if value is None and (type(msg), key) in _OPTIONAL:
            continue
        wire[key] = _encode_value(kind, value, msg)
    data = cbor2.dumps(wire, canonical=True)
    if len(data) > MAX_PAYLOAD_BYTES:
        raise ProtocolError("payload", f"{type(msg).__name__} encodes to {len(data)} bytes, over the "
                            f"{MAX_PAYLOAD_BYTES}-byte cap; send fewer tokens per message")  # fmt: skip
    return data


def _map(field: str, x: object, keys: tuple[str, ...]) -> dict[str, Any]:
    if type(x) is not dict:
        raise ProtocolError(field, f"must be a map, got {type(x).__name__}")
    for k in x:
        if k not in keys:
            raise ProtocolError(f"{field}.{k}", "unknown key (decoding is strict)")
    for k in keys:
        if k not in x:
            raise ProtocolError(f"{field}.{k}", "missing")
    return x


def _untyped(field: str, x: object, tag: int) -> tuple[int, ...]:
    if type(x) is not cbor2.CBORTag or x.tag != tag or type(x.value) is not bytes:
        raise ProtocolError(field, f"must be an RFC 8746 typed array (tag {tag} over a byte string)")
    size = 4 if tag == TAG_UINT32_LE else 2
    if len(x.value) % size:
        raise ProtocolError(field, f"typed array of {len(x.value)} bytes is not a multiple of {size}")
    return struct.unpack(f"<{len(x.value) // size}{'I' if size == 4 else 'H'}", x.value)


def _number(field: str, x: object) -> float:
    if type(x) not in (int, float):
        raise ProtocolError(field, f"must be a number, got {type(x).__name__}")
    return float(x)  # type: ignore[arg-type]


def _decode_value(kind: str, key: str, x: Any, kwargs: dict[str, Any]) -> None:
    if type(x) is _PLAIN.get(kind):
        kwargs[key] = x
    elif kind == _IDS:
        kwargs[key] = _untyped(key, x, TAG_UINT32_LE)
    elif kind == "q":
        if type(x) is not list:
            raise ProtocolError("q", f"must be an array of distributions, got {type(x).__name__}")
        kwargs[key] = tuple(
            SparseDist(
                ids=_untyped("q.ids", m["ids"], TAG_UINT32_LE), w=_untyped("q.w", m["w"], TAG_UINT16_LE)
            )
            for m in (_map("q", d, ("ids", "w")) for d in x)
        )
    elif kind == "sampling":
        m = _map(key, x, _SAMPLING_KEYS)
        for k in ("top_k", "seed"):
            if type(m[k]) is not int:
                raise ProtocolError(f"sampling.{k}", f"must be an int, got {type(m[k]).__name__}")
        try:
            kwargs[key] = SamplingParams(temperature=_number("sampling.temperature", m["temperature"]),
                                         top_k=m["top_k"], top_p=_number("sampling.top_p", m["top_p"]),
                                         seed=m["seed"])  # fmt: skip
        except ProtocolError as exc:
            field = exc.field if exc.field.startswith("sampling.") else f"sampling.{exc.field}"
            raise ProtocolError(field, exc.detail) from exc
    elif kind == "timings":
        m = _map(key, x, _TIMING_KEYS)
        for k in _TIMING_KEYS:
            kwargs[k] = _number(k, m[k])
    elif kind == _N:
        kwargs[key] = _number(key, x)
    elif kind == "floats":
        if type(x) is not list:
            raise ProtocolError(key, f"must be an array of numbers, got {type(x).__name__}")
        kwargs[key] = tuple(_number(key, a) for a in x)
    else:
        want = {_S: "a text string", _U: "an unsigned int", _B: "a bool"}[kind]
        raise ProtocolError(key, f"must be {want}, got {type(x).__name__}")


def _parse(data: object, max_size: int) -> Message:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise ProtocolError("payload", f"must be bytes, got {type(data).__name__}")
    size = memoryview(data).nbytes
    if size > max_size:
        raise ProtocolError("payload", f"{size} bytes is over the {max_size}-byte cap")
    fp = io.BytesIO(data)
    try:
        top = cbor2.CBORDecoder(
            fp, semantic_decoders=_SEMANTIC, max_depth=MAX_DEPTH, allow_indefinite=False,
            allow_duplicate_keys=False, strict_hashable_types=True,
        ).decode()  # fmt: skip
    except Exception as exc:
        raise ProtocolError("payload", f"not a valid strict CBOR item: {exc}") from exc
    if fp.tell() != size:
        raise ProtocolError("payload", f"{size - fp.tell()} trailing bytes after the CBOR map")
    if type(top) is not dict:
        raise ProtocolError("payload", f"must be a CBOR map, got {type(top).__name__}")
    if "v" not in top or type(top["v"]) is not int or top["v"] != PROTOCOL_VERSION:
        raise ProtocolError("v", f"protocol version must be {PROTOCOL_VERSION}, got {top.get('v')!r:.40}")
    cls = _BY_T.get(top["t"]) if type(top.get("t")) is str else None
    if cls is None:
        raise ProtocolError(
            "t", f"unknown message type {top.get('t')!r:.40}; expected one of {sorted(_BY_T)}"
        )
    schema = _SCHEMA[cls]
    for key in top:
        if key not in schema and key not in ("v", "t"):
            raise ProtocolError(str(key), f"unknown field of {cls.T!r} (decoding is strict)")
    kwargs: dict[str, Any] = {}
    for key, kind in schema.items():
        if key in top:
            _decode_value(kind, key, top[key], kwargs)
        elif (cls, key) not in _OPTIONAL:
            raise ProtocolError(key, f"missing from {cls.T!r}")
    return cls(**kwargs)  # type: ignore[no-any-return]


def decode(data: bytes, *, max_size: int = MAX_PAYLOAD_BYTES) -> Message:
    """Decode and validate one payload; strict (see the module docstring).

    The size cap is checked before parsing. Unknown extra keys are rejected, not ignored, so a
    peer speaking another protocol revision fails loudly. Raises ProtocolError, and no other
    exception, for any bad input.
    """
    try:
        return _parse(data, max_size)
    except ProtocolError:
        raise
    except Exception as exc:  # the boundary: nothing but ProtocolError leaves decode
        raise ProtocolError("payload", f"undecodable: {type(exc).__name__}: {exc}") from exc
