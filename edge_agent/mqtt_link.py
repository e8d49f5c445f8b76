"""``MqttLink``: the edge's ``VerifierLink`` through the broker (DESIGN §2, §3, §5).

One MQTT connection per edge process; one subscription to the device's ``down`` topics and one
to the workers' status topics. Replies are routed by session id into per-session queues by the
network thread (which only enqueues); the calling thread decodes and matches them.

Deadlines: a request without its answer within ``round_timeout_s`` is re-sent once with the
same ``seq`` (the owner replays its answer from memory, never verifying twice). A second miss,
or the owner's status turning ``offline`` (Last Will), raises ``SessionError("worker_lost")``;
the loop then re-opens with ``epoch + 1`` and the full committed context (failover). An open
nobody answers raises ``CloudUnavailableError``; a broken broker connection ``BrokerError``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import queue
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterator
from typing import Any

from shared import topics
from shared.errors import BrokerAuthError, BrokerError, CloudUnavailableError, ProtocolError, SessionError
from shared.link import LinkStats
from shared.mqtt import BrokerConfig, Incoming, MqttClient, make_client
from shared.protocol import Close, Decode, Draft, Error, Open, Opened, Tokens, Verdict, decode, encode

log = logging.getLogger(__name__)

_POLL_S = 0.05


class MqttLink:
    """Implements ``shared.link.VerifierLink`` over MQTT for one device; thread-safe across sessions."""

    def __init__(
        self,
        broker: BrokerConfig,
        *,
        device: str,
        round_timeout_s: float = 10.0,
        open_timeout_s: float = 30.0,
        client_id: str | None = None,
    ) -> None:
        self.device = topics.check_device(device)
        self.round_timeout_s = round_timeout_s
        self.open_timeout_s = open_timeout_s
        self.client: MqttClient = make_client(
            broker, client_id=client_id or broker.username or f"{device}-{uuid.uuid4().hex[:8]}"
        )
        self._inbox: dict[str, queue.Queue[Incoming]] = {}
        self._inbox_lock = threading.Lock()
        self._workers: dict[str, bool] = {}  # worker id -> online, from the retained status topics
        self._owner: dict[str, str] = {}  # sid -> worker that answered its open
        self.history: deque[tuple[str, str]] = deque(maxlen=1024)  # (sid, owner) of recent opens
        self._local = threading.local()  # per-thread LinkStats of the last request

    # -- connection -----------------------------------------------------------------------------

    def connect(self, timeout: float = 10.0) -> None:
        """Connect and subscribe; raises ``BrokerError``/``BrokerAuthError`` with what to fix."""
        self.client.connect(timeout)
        self.client.subscribe(f"{topics.PREFIX}/{self.device}/+/down", handler=self._route)
        self.client.subscribe(topics.STATUS_FILTER, handler=self._status)

    def connect_in_background(self, *, first_error: BrokerError, retry_s: float = 2.0) -> None:
        """Keep trying to connect in a thread (the broker was down at start); ``available()``
        stays False until it succeeds. Wrong credentials are not retried."""
        log.warning("%s; retrying every %.0f s in the background", first_error, retry_s)

        def retry() -> None:
            while True:
                time.sleep(retry_s)
                self.client = make_client(self.client.config, client_id=self.client.client_id)
                try:
                    self.connect()
                except BrokerAuthError as exc:
                    log.error("%s", exc)
                    return
                except BrokerError:
                    continue
                log.info("connected to the broker at %s", self.client.config.address)
                return

        threading.Thread(target=retry, name="mqtt-link-connect", daemon=True).start()

    def shutdown(self) -> None:
        self.client.close()

    def available(self) -> bool:
        """Connected to the broker and at least one worker announces itself online."""
        return self.client.connected.is_set() and any(self._workers.values())

    def owner_of(self, sid: str) -> str | None:
        """The worker that owns session ``sid`` now (None once closed)."""
        return self._owner.get(sid)

    def workers_online(self) -> list[str]:
        return sorted(w for w, up in self._workers.items() if up)

    @property
    def last(self) -> LinkStats:
        return getattr(self._local, "stats", LinkStats())

    # -- network thread: enqueue only ----------------------------------------------------------

    def _route(self, msg: Incoming) -> None:
        sid = msg.topic.rsplit("/", 2)[-2]
        self._box(sid).put(msg)

    def _status(self, msg: Incoming) -> None:
        self._workers[msg.topic.rsplit("/", 2)[-2]] = msg.payload == topics.ONLINE

    def _box(self, sid: str) -> queue.Queue[Incoming]:
        with self._inbox_lock:
            box = self._inbox.get(sid)
            if box is None:
                box = self._inbox[sid] = queue.Queue()
            return box

    # -- requests -------------------------------------------------------------------------------

    def _send(
        self, topic: str, msg: Any, *, expiry_s: float | None = None, response: bool = True
    ) -> tuple[int, float]:
        t0 = time.perf_counter()
        payload = encode(msg)
        codec_ms = (time.perf_counter() - t0) * 1e3
        self.client.publish(
            topic,
            payload,
            response_topic=topics.down_topic(self.device, msg.sid) if response else None,
            correlation_data=f"{msg.sid}:{msg.epoch}:{getattr(msg, 'seq', 'open')}".encode(),
            message_expiry=math.ceil(expiry_s) if expiry_s else None,
        )
        return len(payload), codec_ms

    def _await(self, sid: str, deadline: float, match, *, owner: str | None) -> tuple[Any, int, float]:
        """Wait for the reply ``match`` accepts; returns (message, bytes, decode ms).

        Returns (None, ...) at the deadline. Raises ``SessionError("worker_lost")`` as soon as the
        owner is known offline, ``BrokerError`` while the broker is unreachable."""
        box = self._box(sid)
        nbytes, codec_ms = 0, 0.0
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None, nbytes, codec_ms
            if owner is not None and self._workers.get(owner) is False:
                raise SessionError("worker_lost", f"worker {owner} went offline", sid=sid)
            try:
                incoming = box.get(timeout=min(remaining, _POLL_S))
            except queue.Empty:
                continue
            t0 = time.perf_counter()
            try:
                reply = decode(incoming.payload)
            except ProtocolError as exc:
                log.warning("undecodable reply on %s dropped: %s", incoming.topic, exc)
                continue
            codec_ms += (time.perf_counter() - t0) * 1e3
            nbytes += len(incoming.payload)
            if isinstance(reply, Error) and match(reply):
                raise SessionError(reply.code, reply.detail, sid=sid)
            if match(reply):
                return reply, nbytes, codec_ms

    def open(self, msg: Open) -> Opened:
        if not self.client.connected.is_set():
            raise BrokerError(f"not connected to the broker at {self.client.config.address}")
        self._drain(msg.sid)
        up, codec_ms = self._send(topics.open_topic(self.device), msg)
        reply, down, dec_ms = self._await(
            msg.sid,
            time.monotonic() + self.open_timeout_s,
            lambda r: (
                r.sid == msg.sid
                and (
                    (isinstance(r, Opened) and r.epoch == msg.epoch)
                    or (isinstance(r, Error) and r.seq is None)
                )
            ),
            owner=None,
        )
        if reply is None:
            raise CloudUnavailableError(
                f"no worker answered the open within {self.open_timeout_s:.0f} s "
                f"(workers online: {', '.join(self.workers_online()) or 'none'}); start a worker "
                "(`spececd-worker`) or check that it subscribes to this broker"
            )
        self._owner[msg.sid] = reply.worker
        self.history.append((msg.sid, reply.worker))
        self._local.stats = LinkStats(up, down, codec_ms + dec_ms)
        return reply

    def verify(self, msg: Draft) -> Verdict:
        return self._request(
            msg, lambda r: isinstance(r, Verdict) and r.seq == msg.seq and r.epoch == msg.epoch
        )

    def decode(self, msg: Decode) -> Iterator[Tokens]:
        """Stream the owner's ``Tokens`` parts; a retry skips the parts already received."""

        def is_part(r: Any) -> bool:
            return isinstance(r, Tokens) and r.seq == msg.seq and r.epoch == msg.epoch

        next_part = 0
        first = self._request(msg, lambda r: is_part(r) and r.part == 0)
        yield first
        next_part = 1
        done = first.done
        while not done:
            want = next_part
            part = self._request(msg, lambda r, want=want: is_part(r) and r.part == want, resend=False)
            yield part
            next_part += 1
            done = part.done

    def _request(self, msg: Draft | Decode, match, *, resend: bool = True) -> Any:
        """Send (unless continuing a stream), wait, re-send once, then give the owner up."""
        owner = self._owner.get(msg.sid)
        is_reply = lambda r: match(r) or (isinstance(r, Error) and r.seq in (msg.seq, None))  # noqa: E731
        topic = topics.up_topic(self.device, msg.sid)
        up, codec_ms = self._send(topic, msg, expiry_s=self.round_timeout_s) if resend else (0, 0.0)
        for attempt in range(2):
            reply, down, dec_ms = self._await(
                msg.sid, time.monotonic() + self.round_timeout_s, is_reply, owner=owner
            )
            if reply is not None:
                self._local.stats = LinkStats(up, down, codec_ms + dec_ms)
                return reply
            if not self.client.connected.is_set():
                raise BrokerError(
                    f"lost the broker at {self.client.config.address} while waiting for seq {msg.seq}"
                )
            if attempt == 0:
                log.info(
                    "no answer to seq %d of %s within %.1f s: re-sending",
                    msg.seq,
                    msg.sid,
                    self.round_timeout_s,
                )
                more, _ = self._send(topic, msg, expiry_s=self.round_timeout_s)
                up += more
        raise SessionError("worker_lost", f"worker {owner} did not answer seq {msg.seq} twice", sid=msg.sid)

    def close(self, msg: Close) -> None:
        with contextlib.suppress(BrokerError):  # best effort: idle sessions are evicted anyway
            self._send(topics.up_topic(self.device, msg.sid), msg, response=False)
        self._owner.pop(msg.sid, None)
        with self._inbox_lock:
            self._inbox.pop(msg.sid, None)

    def _drain(self, sid: str) -> None:
        """Drop replies left from an earlier epoch of the session."""
        box = self._box(sid)
        while True:
            try:
                box.get_nowait()
            except queue.Empty:
                return
