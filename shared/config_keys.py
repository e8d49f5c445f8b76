"""The keys of the SpecECD configuration: their parsers, defaults and help, and ``Secret``.

``shared.config`` loads and merges; this module says what each key accepts. ``KEYS`` is the one
table the loader, the command-line flags and ``deploy/README.md`` follow.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

ENV_PREFIX = "SPECECD_"
KINDS = ("edge", "worker")
MASK = "********"


class Secret:
    """A secret string whose repr and str are masked; ``reveal()`` gives the value."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        """The secret itself: pass it to the library that needs it, never to a log."""
        return self._value

    def __repr__(self) -> str:
        return f"Secret('{MASK}')"

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return repr(self)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(("Secret", self._value))


class HostPort(NamedTuple):
    """A ``host:port`` address; ``str()`` gives it back in that form."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


# ---------------------------------------------------------------- value parsers
class BadValue(Exception):
    """Raised by a parser with the text of what is allowed."""


Parser = Callable[[Any, bool], Any]  # (value, came_as_text) -> parsed value


def _described(parse: Parser, allowed: str, choices: tuple[str, ...] | None = None) -> Parser:
    """Tag a parser with the text of what it allows (shown in ``--help``) and its choices."""
    parse.allowed = allowed  # type: ignore[attr-defined]
    parse.choices = choices  # type: ignore[attr-defined]
    return parse


def _int(lo: int, hi: int) -> Parser:
    allowed = f"an integer from {lo} to {hi}"

    def parse(v: Any, text: bool) -> int:
        if text and isinstance(v, str):
            try:
                v = int(v.strip(), 10)
            except ValueError:
                raise BadValue(allowed) from None
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise BadValue(allowed)
        return v

    return _described(parse, allowed)


def _float(lo: float, hi: float, *, lo_open: bool = False) -> Parser:
    allowed = f"a number in {'(' if lo_open else '['}{lo}, {hi}]"

    def parse(v: Any, text: bool) -> float:
        if text and isinstance(v, str):
            try:
                v = float(v.strip())
            except ValueError:
                raise BadValue(allowed) from None
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise BadValue(allowed)
        if v > hi or v < lo or (lo_open and v == lo):
            raise BadValue(allowed)
        return float(v)

    return _described(parse, allowed)


_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


def _bool(v: Any, text: bool) -> bool:
    if text and isinstance(v, str) and v.strip().lower() in _TRUE | _FALSE:
        return v.strip().lower() in _TRUE
    if not isinstance(v, bool):
        raise BadValue("true or false" + (" (or 1/0, yes/no, on/off)" if text else ""))
    return v


_described(_bool, "true or false")


def _choice(*options: str, fold: bool = False) -> Parser:
    allowed = "one of " + ", ".join(repr(o) for o in options)

    def parse(v: Any, text: bool) -> str:
        key = v.lower() if fold and isinstance(v, str) else v
        if key not in options:
            raise BadValue(allowed)
        return key

    return _described(parse, allowed, options)


def _str(pattern: str | None = None, what: str = "a non-empty string") -> Parser:
    rx = re.compile(pattern) if pattern else None

    def parse(v: Any, text: bool) -> str:
        if not isinstance(v, str) or not v.strip() or (rx and not rx.fullmatch(v)):
            raise BadValue(what)
        return v

    return _described(parse, what)


def _hostport(*, listen: bool = False) -> Parser:
    """Broker addresses may omit the port; listen addresses need one (0 = any free port)."""
    if listen:
        allowed = "HOST:PORT to listen on, port 0 to 65535, e.g. 127.0.0.1:8000 or [::]:9464"
    else:
        allowed = "HOST or HOST:PORT, port 1 to 65535, e.g. 127.0.0.1:1883 or [::1]:8883 (no scheme)"

    def parse(v: Any, text: bool) -> tuple[str, int | None]:
        m = (
            re.fullmatch(r"\[([0-9A-Fa-f:.]+)\](?::(\d+))?|([A-Za-z0-9_.-]+)(?::(\d+))?", v.strip())
            if isinstance(v, str)
            else None
        )
        if not m:
            raise BadValue(allowed)
        host, port = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
        if (port is None and listen) or (port is not None and not (0 if listen else 1) <= int(port) <= 65535):
            raise BadValue(allowed)
        return host, None if port is None else int(port)

    return _described(parse, allowed)


def parse_hostport(text: str, *, default_port: int | None = None, listen: bool = False) -> HostPort:
    """The one ``host:port`` parser of the project (config keys, the tap, ``BrokerConfig``).

    Raises ``BadValue`` with the allowed form; a missing port takes ``default_port``."""
    host, port = _hostport(listen=listen)(text, True)
    if port is None:
        if default_port is None:
            raise BadValue(_hostport(listen=listen).allowed)  # type: ignore[attr-defined]
        port = default_port
    return HostPort(host, port)


# the topic-level names of shared.topics (and of broker/add-device.sh): never + # / or controls
_NAME = _str(r"[A-Za-z0-9_.-]{1,64}", "1-64 characters of A-Z a-z 0-9 _ . - (it appears in MQTT topics)")
_ANY = _str()


@dataclass(frozen=True)
class _Key:
    """One row of the table: the key's name is also its TOML name; ``env``/``flag`` follow it."""

    name: str
    kinds: tuple[str, ...]
    parse: Parser
    default: Any
    help: str
    path: bool = False  # relative paths in a file are taken from the file's folder
    secret: bool = False  # never on the command line, never shown
    aliases: tuple[str, ...] = ()  # older or other tools' flag spellings, still accepted
    default_text: str | None = None  # how --help and the docs show a computed default

    @property
    def env(self) -> str:
        return env_name(self.name)

    @property
    def flag(self) -> str:
        return flag_name(self.name)

    @property
    def is_bool(self) -> bool:
        return self.parse is _bool

    @property
    def allowed(self) -> str:
        return getattr(self.parse, "allowed", "")

    @property
    def choices(self) -> tuple[str, ...] | None:
        return getattr(self.parse, "choices", None)


Key = _Key


_BOTH, _E, _W = ("edge", "worker"), ("edge",), ("worker",)
_DTYPES = ("auto", "float32", "float16", "bfloat16")
_LEVELS = ("debug", "info", "warning", "error", "critical")
_MODEL_DEVICE = _str(r"auto|cpu|mps|cuda(:\d+)?", "'auto', 'cpu', 'mps', 'cuda' or 'cuda:N'")
MAX_GAMMA = 64  # shared.protocol.MAX_GAMMA: the most draft tokens one round carries


def _or_auto(numbers: Parser) -> Parser:
    allowed = f"'auto' or {numbers.allowed}"  # type: ignore[attr-defined]

    def parse(v: Any, text: bool) -> int | float | str:
        if isinstance(v, str) and v.strip().lower() == "auto":
            return "auto"
        try:
            return numbers(v, text)
        except BadValue:
            raise BadValue(allowed) from None

    return _described(parse, allowed)


# "auto": the edge's γ controller picks each round (edge_agent/gamma.py)
_GAMMA = _or_auto(_int(1, MAX_GAMMA))
DEFAULT_MAX_SESSIONS = 64  # the worker's sessions kept; cloud_worker and the bench use this one
MAX_BODY_BYTES = 1 << 20
KEYS: dict[str, _Key] = {
    k.name: k
    for k in [
        _Key(
            "broker", _BOTH, _hostport(), "127.0.0.1:1883", "broker HOST:PORT (port 8883 if TLS, else 1883)"
        ),
        _Key("username", _BOTH, _NAME, None, "MQTT username (the device or worker name)"),
        _Key("password", _BOTH, _ANY, None, "MQTT password (env or file only)", secret=True),
        _Key("password_file", _BOTH, _ANY, None, "file holding the MQTT password", path=True),
        _Key(
            "tls_ca",
            _BOTH,
            _ANY,
            None,
            "CA certificate file; turns TLS on",
            path=True,
            aliases=("--ca-file",),
        ),
        _Key(
            "tls_cert",
            _BOTH,
            _ANY,
            None,
            "client certificate file (with tls_key)",
            path=True,
            aliases=("--cert-file",),
        ),
        _Key(
            "tls_key",
            _BOTH,
            _ANY,
            None,
            "client private key file (with tls_cert)",
            path=True,
            aliases=("--key-file",),
        ),
        _Key(
            "tls_insecure",
            _BOTH,
            _bool,
            False,
            "skip the broker hostname check (testing only)",
            aliases=("--insecure",),
        ),
        _Key("keepalive", _BOTH, _int(5, 3600), 30, "MQTT keepalive in seconds"),
        _Key(
            "device",
            _E,
            _NAME,
            None,
            "device name in topics",
            default_text="the username, else the host name",
        ),
        _Key("worker_id", _W, _NAME, None, "worker id", default_text="the username, else the host name"),
        _Key("draft", _BOTH, _ANY, "meta-llama/Llama-3.2-1B-Instruct", "draft model: hub id, folder or GGUF"),
        _Key(
            "target", _BOTH, _ANY, "meta-llama/Llama-3.1-8B-Instruct", "target model: hub id, folder or GGUF"
        ),
        _Key("model_device", _BOTH, _MODEL_DEVICE, "auto", "torch device of the model"),
        _Key("dtype", _BOTH, _choice(*_DTYPES), "auto", "model dtype"),
        _Key(
            "cpu_linear",
            _W,
            _choice("onednn", "torch"),
            "onednn",
            "kernels of the target's fp32 linear layers on a CPU: oneDNN, or torch's own (MKL)",
        ),
        _Key(
            "invariant",
            _W,
            _choice("auto", "on", "off"),
            "auto",
            "shape-invariant target forwards (a position's logits do not depend on the forward's "
            "shape): 'auto' = on for a bf16/fp16 target on a CPU",
        ),
        _Key(
            "draft_backend",
            _E,
            _choice("auto", "torch", "llama.cpp"),
            "auto",
            "runtime of the draft: 'auto' runs a .gguf with llama.cpp (if installed), else torch",
        ),
        _Key("draft_threads", _E, _int(0, 1024), 0, "threads of the draft model (0 = the cores it may use)"),
        _Key("gamma", _E, _GAMMA, "auto", "draft tokens per round, or 'auto': chosen each round"),
        _Key("pipeline", _E, _bool, True, "draft the next block while the current one is verified"),
        _Key("max_new_tokens", _E, _int(1, 1_000_000), 256, "default generation length"),
        _Key("temperature", _E, _float(0.0, 100.0), 0.0, "sampling temperature (0 = greedy)"),
        _Key("top_p", _E, _float(0.0, 1.0, lo_open=True), 1.0, "nucleus sampling (1 = off)"),
        _Key("top_k", _E, _int(0, 1_000_000), 0, "top-k sampling (0 = off)"),
        _Key("seed", _E, _int(0, 2**63 - 1), 0, "sampling seed"),
        _Key("mode", _E, _choice("speculative", "cloud-only", "edge-only"), "speculative", "decoding mode"),
        _Key("on_cloud_unreachable", _E, _choice("draft", "wait", "fail"), "draft", "fallback policy"),
        _Key(
            "round_timeout_ms",
            _E,
            _int(1, 600_000),
            10_000,
            "deadline of one verify round (then one re-send, then failover)",
        ),
        _Key("listen", _E, _hostport(listen=True), "127.0.0.1:8000", "local HTTP API HOST:PORT"),
        _Key("max_queue", _E, _int(1, 100_000), 16, "pending HTTP requests before 429"),
        _Key("max_concurrent", _E, _int(1, 64), 1, "HTTP generations at once"),
        _Key(
            "model_name",
            _E,
            _ANY,
            None,
            "the model name API clients send",
            default_text="the target's folder name",
        ),
        _Key(
            "max_body_bytes",
            _E,
            _int(1024, 1 << 30),
            MAX_BODY_BYTES,
            "largest HTTP request body (413 beyond)",
        ),
        _Key("watchdog", _E, _bool, True, "send systemd watchdog pings when WATCHDOG_USEC is set"),
        _Key("max_sessions", _W, _int(1, 1_000_000), DEFAULT_MAX_SESSIONS, "sessions kept (LRU beyond)"),
        _Key(
            "max_batch_tokens",
            _W,
            _int(1, 1_000_000),
            512,
            "positions per target forward (padded: rows x widest row)",
        ),
        _Key("max_batch_sessions", _W, _int(1, 4096), 32, "sessions per target forward (1 = unbatched)"),
        _Key(
            "batch_window_ms",
            _W,
            _or_auto(_float(0.0, 10_000.0)),
            "auto",
            "wait for the sessions the last forward answered: 'auto' for those expected back "
            "within half a forward, or up to this many ms for all (0 = take what is queued)",
        ),
        _Key(
            "width_rule",
            _W,
            _choice("ratio", "cost"),
            "ratio",
            "which rows share a padded forward: 'ratio' up to twice a row's length or 3 past it, "
            "'cost' while the worker's measured forwards say the padding costs at most a quarter more",
        ),
        _Key(
            "batch_layout",
            _W,
            _choice("padded", "packed"),
            "padded",
            "how a forward lays out its rows: 'padded' = rows x widest row (the width rule applies), "
            "'packed' = one sequence of the real positions, a mask per session (no padding)",
        ),
        _Key(
            "shared_prefill_tokens",
            _W,
            _or_auto(_int(1, 1_000_000)),
            "auto",
            "positions an open's prefill may hold in a forward that carries other sessions' "
            "drafts or decodes, or leaves some waiting: 'auto' = as many as those hold, at least "
            "16 (the rest of the prefill goes in the next forwards)",
        ),
        _Key(
            "fair_wait_ms",
            _W,
            _float(0.0, 10_000.0),
            20.0,
            "wait for a device owed model time (capped at a quarter of a mean forward)",
        ),
        _Key(
            "max_cached_tokens",
            _W,
            _int(1, 1 << 40),
            1 << 20,
            "KV-cached tokens over all sessions (LRU beyond)",
        ),
        _Key(
            "max_sessions_per_device",
            _W,
            _int(0, 1_000_000),
            0,
            "sessions one device may hold (0 = only max_sessions; the device holding most is evicted first)",
        ),
        _Key(
            "max_opens_per_s_per_device", _W, _float(0.0, 1e6), 20.0, "opens per second per device (0 = off)"
        ),
        _Key("metrics_listen", _W, _hostport(listen=True), None, "Prometheus HOST:PORT (unset = off)"),
        _Key("log_level", _BOTH, _choice(*_LEVELS, fold=True), "info", "log level"),
        _Key("log_json", _BOTH, _bool, False, "log one JSON object per line"),
        _Key("cache", _BOTH, _ANY, None, "folder for converted model weights", path=True),
        _Key(
            "allow_download",
            _BOTH,
            _bool,
            False,
            "download hub models missing from the cache (HF_HUB_OFFLINE=1 forbids it)",
        ),
        _Key("hf_token", _BOTH, _ANY, None, "Hugging Face token (env or file only)", secret=True),
        _Key("hf_token_file", _BOTH, _ANY, None, "file holding the Hugging Face token", path=True),
    ]
}
SECRET_PAIRS = {"password": "password_file", "hf_token": "hf_token_file"}


def keys_for(kind: str) -> list[str]:
    """The config keys of ``kind`` ("edge" or "worker"), in documentation order."""
    check_kind(kind)
    return [k.name for k in KEYS.values() if kind in k.kinds]


def env_name(key: str) -> str:
    """The environment variable of a key: ``gamma`` -> ``SPECECD_GAMMA``."""
    return ENV_PREFIX + key.upper()


def flag_name(key: str) -> str:
    """The command-line flag of a key: ``max_new_tokens`` -> ``--max-new-tokens``."""
    return "--" + key.replace("_", "-")


def help_text(key: str) -> str:
    """The ``--help`` text of a key: what it does, what it allows, its default and env var."""
    spec = KEYS[key]
    default = spec.default_text or ("unset" if spec.default is None else spec.default)
    if spec.is_bool:
        default = "on" if spec.default else "off"
    allowed = f"; {spec.allowed}" if spec.allowed and not spec.is_bool and spec.parse is not _ANY else ""
    return f"{spec.help}{allowed}; default {default}; env {spec.env}".replace("%", "%%")


def check_kind(kind: str) -> None:
    """Raise ValueError unless ``kind`` is "edge" or "worker"."""
    if kind not in KINDS:
        raise ValueError(f"kind must be 'edge' or 'worker', got {kind!r}")
