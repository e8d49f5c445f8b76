"""``spececd-tap``: watch SpecECD traffic on a broker, decoded.

    spececd-tap                                   # everything under spececd/ on 127.0.0.1:1883
    spececd-tap 'spececd/v1/devA/+/down' --count 5
    spececd-tap --broker mqtt.example.org:8883 --tls-ca ca.crt --username ops --password-file pw

Each message is printed as one header line (topic, message type, payload size, MQTT 5
properties) and one line of fields. CBOR payloads are decoded with ``shared.protocol.decode``;
text payloads (a worker's retained ``online``/``offline``) are printed as text; anything else is
shown as malformed with the decoder's error and the first bytes in hex. The tap never crashes on
a payload. A draft's line starts with its γ (the edge's choice for that round; why it chose it
is in the edge's ``RoundStats.gamma_reason``, its logs and metrics); verdicts show ``n_acc`` and,
from batching workers, ``batch`` / ``batch_pos`` / ``pos_ms`` / ``row_med``.

On a production broker, log in with a username of its own: the broker gives each username one
connection (``use_username_as_clientid``), so tapping as a device or worker kicks that client off.
"""

from __future__ import annotations

import argparse
import dataclasses
import queue
import sys
import time
import uuid
from typing import TextIO

from shared.config import add_broker_arguments, add_version_argument, broker_settings_from_args
from shared.errors import BrokerError, ConfigError, ProtocolError
from shared.mqtt import CBOR, Incoming, broker_config_from_settings, make_client
from shared.protocol import decode
from shared.topics import ALL_FILTER

_SHOW_ITEMS = 8  # long id lists are cut to this many items


def format_message(msg: Incoming) -> str:
    """Two lines describing ``msg``: header (topic, type, size, properties) and the decoded fields."""
    props = []
    if msg.content_type is not None:
        props.append(f"content-type={msg.content_type}")
    if msg.response_topic is not None:
        props.append(f"response-topic={msg.response_topic}")
    if msg.correlation_data is not None:
        props.append(f"correlation-data={msg.correlation_data.hex()}")
    if msg.message_expiry is not None:
        props.append(f"expiry={msg.message_expiry}s")
    if msg.retain:
        props.append("retained")
    kind, body = _describe(msg)
    return f"{msg.topic}  {kind}  {len(msg.payload)} B  [{' '.join(props)}]\n    {body}"


def _describe(msg: Incoming) -> tuple[str, str]:
    try:
        decoded = decode(msg.payload)
    except ProtocolError as exc:
        text = _as_text(msg.payload)
        if text is not None and msg.content_type != CBOR:
            return "text", repr(text)
        return "MALFORMED", f"{exc}; payload starts {msg.payload[:32].hex()}"
    except Exception as exc:  # a decoder bug must not stop the tap either
        return "MALFORMED", f"decoder raised {type(exc).__name__}: {exc}"
    fields = " ".join(f"{f.name}={_short(getattr(decoded, f.name))}" for f in dataclasses.fields(decoded))
    kind = getattr(decoded, "T", type(decoded).__name__)
    if kind == "draft":  # the draft length the edge chose this round (fixed, or its γ controller's pick)
        fields = f"γ={len(decoded.tok)} {fields}"
    return kind, fields


def _as_text(payload: bytes) -> str | None:
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return text if text.isprintable() else None


def _short(value: object) -> str:
    if isinstance(value, tuple) and len(value) > _SHOW_ITEMS:
        head = ", ".join(_short(v) for v in value[:_SHOW_ITEMS])
        return f"({head}, ... {len(value) - _SHOW_ITEMS} more)"
    if isinstance(value, tuple):
        return "(" + ", ".join(_short(v) for v in value) + ("," if len(value) == 1 else "") + ")"
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        inner = ", ".join(f"{f.name}={_short(getattr(value, f.name))}" for f in dataclasses.fields(value))
        return f"{type(value).__name__}({inner})"
    return repr(value)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="spececd-tap", description="Print SpecECD MQTT traffic, decoded.")
    p.add_argument("filter", nargs="?", default=ALL_FILTER, help=f"topic filter (default {ALL_FILTER})")
    add_version_argument(p)
    # the same flags (and SPECECD_* variables) as the edge and the worker; --ca-file, --cert-file,
    # --key-file and --insecure are still accepted. Use a username of its own on a production broker.
    add_broker_arguments(p)
    p.add_argument("--count", type=int, default=0, help="exit after N messages (default: run until ^C)")
    p.add_argument("--timeout", type=float, default=0, help="exit with status 1 after S seconds")
    return p


def main(argv: list[str] | None = None, out: TextIO | None = None) -> int:
    """Run the tap; return the exit status (0 done, 1 timed out, 2 broker or usage error)."""
    args = _parser().parse_args(argv)
    out = out or sys.stdout
    try:
        config = broker_config_from_settings(broker_settings_from_args(args))
        client = make_client(config, client_id=config.username or f"spececd-tap-{uuid.uuid4().hex[:8]}")
        client.connect(timeout=10)
    except (BrokerError, ConfigError) as exc:
        print(f"spececd-tap: {exc}", file=sys.stderr)
        return 2
    try:
        client.subscribe(args.filter)
        print(f"spececd-tap: subscribed to {args.filter} on {config.address}", file=sys.stderr, flush=True)
        return _print_loop(client.messages, out, count=args.count, timeout=args.timeout)
    except BrokerError as exc:
        print(f"spececd-tap: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0
    finally:
        client.close()


def _print_loop(messages: queue.Queue[Incoming], out: TextIO, *, count: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout if timeout > 0 else None
    seen = 0
    while count <= 0 or seen < count:
        wait = 1.0 if deadline is None else deadline - time.monotonic()
        if wait <= 0:
            wanted = (
                f"{seen} of {count} messages" if count > 0 else f"{seen} message{'' if seen == 1 else 's'}"
            )
            print(f"spececd-tap: timed out after {timeout:g} s ({wanted})", file=sys.stderr)
            return 1
        try:
            msg = messages.get(timeout=min(wait, 1.0))
        except queue.Empty:
            continue
        print(format_message(msg), file=out, flush=True)
        seen += 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
