"""Structured logging for both sides: plain text or one JSON object per line, secrets masked.

``setup_logging(level, json=...)`` installs one handler on the root logger (calling it again
replaces it). JSON lines carry ``ts`` (UTC, ISO 8601), ``level``, ``logger``, ``msg`` and every
``extra={...}`` field; text lines append the extra fields as ``key=value``.

Secrets never reach the output: the handler's :class:`SecretFilter` masks the value of any
field whose name looks like a credential (``password``, ``token``, ``secret``, ``api_key``,
``authorization``, ...), ``key=value`` / ``key: value`` pairs of such names inside messages,
and any literal secret value registered with :func:`register_secret` or
:func:`register_secrets_of` (``Secret`` objects of the config already mask their own repr).
:func:`log_session_start` / :func:`log_session_end` write the one line per session that
operators grep for.
"""

from __future__ import annotations

import dataclasses
import json as jsonlib
import logging
import re
import sys
import threading
from datetime import UTC, datetime
from typing import Any, TextIO

from shared.config_keys import MASK, Secret

__all__ = [
    "JsonFormatter",
    "SecretFilter",
    "TextFormatter",
    "log_session_end",
    "log_session_start",
    "register_secret",
    "register_secrets_of",
    "setup_logging",
]

SESSION_LOGGER = "spececd.session"
_WORDS = r"(?:password|passwd|passphrase|secret|token|api[_-]?key|authorization|credentials?)"
_SECRET_NAME = re.compile(rf"^(?:[\w-]*[_-])?{_WORDS}$", re.I)  # hf_token, password; not max_new_tokens
_SECRET_PAIR = re.compile(
    rf"(?P<key>\b(?:[\w-]*[_-])?{_WORDS}\b)"
    r"(?P<sep>\"?\s*[=:]\s*\"?)(?:(?P<scheme>bearer|basic)\s+)?(?P<value>[^\s\"',;}]+)",
    re.I,
)
# LogRecord attributes that are not "extra" fields.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message",
    "asctime",
    "taskName",
}
# extras other libraries attach that must not reach the output: uvicorn's ANSI-coloured copy
# of every message
_DROPPED = frozenset({"color_message"})
_MIN_SECRET_LEN = 4  # shorter literals would mask ordinary words

_secrets: set[str] = set()
_secrets_lock = threading.Lock()


def register_secret(value: str | Secret | None) -> None:
    """Mask every later occurrence of ``value`` in log output (no-op for None / very short values)."""
    if isinstance(value, Secret):
        value = value.reveal()
    if value and len(value) >= _MIN_SECRET_LEN:
        with _secrets_lock:
            _secrets.add(value)


def register_secrets_of(config: Any) -> int:
    """Register every ``Secret`` held by ``config`` (a config dataclass, nested ones included)
    with :func:`register_secret`; returns how many were found. Call it right after loading."""
    found = 0
    seen: set[int] = set()

    def walk(obj: Any) -> None:
        nonlocal found
        if id(obj) in seen:
            return
        seen.add(id(obj))
        if isinstance(obj, Secret):
            register_secret(obj)
            found += 1
        elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            for f in dataclasses.fields(obj):
                walk(getattr(obj, f.name))

    walk(config)
    return found


def _mask_text(text: str) -> str:
    def pair(m: re.Match[str]) -> str:
        scheme = f"{m['scheme']} " if m["scheme"] else ""
        return f"{m['key']}{m['sep']}{scheme}{MASK}"

    text = _SECRET_PAIR.sub(pair, text)
    with _secrets_lock:
        known = sorted(_secrets, key=len, reverse=True)
    for value in known:
        if value in text:
            text = text.replace(value, MASK)
    return text


def _mask_value(name: str, value: Any) -> Any:
    if _SECRET_NAME.search(name) and value is not None and not isinstance(value, bool | int | float):
        return MASK
    if isinstance(value, Secret):
        return MASK
    if isinstance(value, str):
        return _mask_text(value)
    if isinstance(value, dict):
        return {k: _mask_value(str(k), v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_mask_value(name, v) for v in value]
    return value


class SecretFilter(logging.Filter):
    """Masks credentials in a record: its message (args merged in), extra fields and exception."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: keep the raw text rather than drop the line
            message = f"{record.msg} {record.args}"
        record.msg, record.args = _mask_text(message), None
        for key, value in list(vars(record).items()):
            if key not in _STANDARD:
                setattr(record, key, _mask_value(key, value))
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = _mask_text(record.exc_text)
            record.exc_info = None  # formatters use the masked exc_text
        return True


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD and k not in _DROPPED}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, extra fields, exc (when any)."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, tz=UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in _extras(record).items():
            out.setdefault(key, value)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            out["exc"] = record.exc_text
        return jsonlib.dumps(out, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """``ts LEVEL logger: msg key=value ...`` for terminals and journald."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extra = " ".join(f"{k}={_short(v)}" for k, v in _extras(record).items())
        if not extra:
            return line
        head, sep, tail = line.partition("\n")  # keep a traceback below the fields
        return f"{head} {extra}{sep}{tail}"


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    text = str(value)
    return jsonlib.dumps(text) if (" " in text or not text) else text


def setup_logging(
    level: str | int = "INFO", json: bool = False, *, stream: TextIO | None = None
) -> logging.Handler:
    """Log to ``stream`` (stderr) at ``level``, as JSON lines when ``json``; returns the handler.

    Replaces the handler of an earlier call (so tests and re-configuration do not double lines).
    Raises ValueError for an unknown level name.
    """
    if isinstance(level, str):
        name = level.upper()
        if name not in logging.getLevelNamesMapping():
            raise ValueError(f"unknown log level {level!r}: use DEBUG, INFO, WARNING, ERROR or CRITICAL")
        level = logging.getLevelNamesMapping()[name]
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "_spececd", False)]:
        root.removeHandler(old)
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler._spececd = True  # type: ignore[attr-defined]
    handler.setFormatter(JsonFormatter() if json else TextFormatter())
    handler.addFilter(SecretFilter())
    root.addHandler(handler)
    root.setLevel(level)
    _libraries_through_root(progress_bars=not json)
    return handler


def _libraries_through_root(*, progress_bars: bool) -> None:
    """Route transformers' own stderr handler through ours (one format, secrets masked), and
    with JSON logs turn off the hub's and transformers' progress bars: a bar is not a JSON line.
    A download still reports itself through ``shared.models``' log lines."""
    import os

    if not progress_bars:
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"  # for a huggingface_hub imported later
    try:
        import huggingface_hub.utils as hub_utils
        import transformers.utils.logging as tf_logging
    except ImportError:  # the tap and other light tools run without them
        return
    tf_logging.disable_default_handler()
    tf_logging.enable_propagation()
    if progress_bars:
        return
    hub_utils.disable_progress_bars()
    tf_logging.disable_progress_bar()


def log_session_start(
    sid: str, opts: Any, prompt_tokens: int, *, logger: logging.Logger | None = None
) -> None:
    """One line when a generation starts: sid, mode, γ, token budget, prompt length."""
    (logger or logging.getLogger(SESSION_LOGGER)).info(
        "session start",
        extra={
            "sid": sid,
            "mode": opts.mode,
            "gamma": opts.gamma,
            "max_new_tokens": opts.max_new_tokens,
            "temperature": opts.params.temperature,
            "prompt_tokens": prompt_tokens,
        },
    )


def log_session_end(result: Any, opts: Any, sid: str, *, logger: logging.Logger | None = None) -> None:
    """One line when a generation ends, with its figures (``GenerationResult.summary()``)."""
    fields = {"sid": sid, "mode": opts.mode, "gamma": opts.gamma}
    for key, value in result.summary().items():
        fields[key] = round(value, 4) if isinstance(value, float) else value
    (logger or logging.getLogger(SESSION_LOGGER)).info("session end", extra=fields)
