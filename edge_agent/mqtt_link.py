"""``MqttLink``: the edge's ``VerifierLink`` through the broker (DESIGN §2, §3, §5).

One MQTT connection per edge process; one subscription to the device's ``down`` topics and one
to the workers' status topics.

Receive path: a table of pending requests keyed by (sid, epoch, seq, part), each a future
(``_Pending``). The message handler (paho's network thread; decoding a reply is microseconds)
resolves the request's future, or fails it on an ``error`` reply; a worker whose status leaves
``online`` fails the futures of its sessions (``worker_lost``); a lost broker connection fails
every future with ``BrokerError`` at once. So a caller wakes the moment its answer, its owner's
death or the broker's loss is known, never at a polling tick or at the deadline.

Deadlines: a request without its answer within ``round_timeout_s`` is re-sent once with the
same ``seq`` (the owner replays its answer from memory, never verifying twice); a second miss
raises ``SessionError("worker_lost")``, and the loop re-opens with ``epoch + 1`` and the
committed context (failover). An open answered ``overloaded`` (a worker shutting down) is sent
again, so the shared subscription hands it to another worker. An open with no worker online
raises ``CloudUnavailableError`` at once; one nobody answers, after ``open_timeout_s``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

from shared import topics
from shared.errors import BrokerError, CloudUnavailableError, ProtocolError, SessionError
from shared.link import LinkStats
from shared.mqtt import BrokerConfig, Incoming, MqttClient, make_client
from shared.protocol import Close, Decode, Draft, Error, Open, Opened, Tokens, Verdict, decode, encode

log = logging.getLogger(__name__)

OPEN_SEQ = -1  # the seq of an open in the pending table
STATUS_GRACE_S = 0.5  # retained worker statuses arrive just after the SUBACK: wait this long for them
OVERLOADED_RETRY_S = 0.05

Key = tuple[str, int, int, int]  # (sid, epoch, seq, part)
Reply = tuple[Any, int, float]  # (message, payload bytes, decode ms)


class _Pending:
    """Pending requests by (sid, epoch, seq, part), each a ``Future[Reply]``; thread-safe.

    A streamed answer (``decode``: parts 0, 1, ...) is registered as a stream (sid, epoch, seq):
    its parts get futures as they arrive or are awaited, and a failure of the stream reaches the
    part awaited next even if it was not awaited yet."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: dict[Key, tuple[Future[Reply], str | None]] = {}
        self._streams: dict[tuple[str, int, int], tuple[str | None, BaseException | None]] = {}

    def add(self, key: Key, owner: str | None) -> Future[Reply]:
        """The future of ``key`` (made now, or earlier by an early reply of a stream)."""
        with self._lock:
            item = self._items.get(key)
            if item is None:
                item = self._items[key] = (Future(), owner)
                failed = self._streams.get(key[:3], (None, None))[1]
                if failed is not None:
                    item[0].set_exception(failed)
            return item[0]

    def pop(self, key: Key) -> None:
        with self._lock:
            self._items.pop(key, None)

    def open_stream(self, prefix: tuple[str, int, int], owner: str | None) -> None:
        with self._lock:
            self._streams[prefix] = (owner, None)

    def close_stream(self, prefix: tuple[str, int, int]) -> None:
        with self._lock:
            self._streams.pop(prefix, None)
            for key in [k for k in self._items if k[:3] == prefix]:
                del self._items[key]

    def resolve(self, key: Key, reply: Reply) -> bool:
        """Hand ``reply`` to the request waiting for it; False when nobody waits (stale/duplicate)."""
        with self._lock:
            item = self._items.get(key)
            if item is None and key[:3] in self._streams:
                item = self._items[key] = (Future(), self._streams[key[:3]][0])
            if item is None or item[0].done():
                return False
            item[0].set_result(reply)
            return True

    def fail(self, exc_for: Callable[[Key, str | None], BaseException | None]) -> int:
        """Fail every pending future for which ``exc_for(key, owner)`` gives an exception."""
        n = 0
        with self._lock:
            for key, (future, owner) in self._items.items():
                exc = exc_for(key, owner)
                if exc is not None and not future.done():
                    future.set_exception(exc)
                    n += 1
            for prefix, (owner, failed) in list(self._streams.items()):
                exc = exc_for((*prefix, -1), owner)
                if exc is not None and failed is None:
                    self._streams[prefix] = (owner, exc)
        return n


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
        self.client.on_disconnect.append(self._on_broker_lost)
        self.client.on_reconnect.append(self._statuses_resubscribed)
        self._pending = _Pending()
        self._workers: dict[str, bytes] = {}  # worker id -> its retained status payload
        self._workers_cond = threading.Condition()  # guards _workers; notified on every status
        self._status_since = math.inf  # when the status subscription was (re)made
        self._owner: dict[str, str] = {}  # sid -> worker that answered its open
        self._orphans: OrderedDict[str, Error] = OrderedDict()  # sid -> error for its next request
        self.history: deque[tuple[str, str]] = deque(maxlen=1024)  # (sid, owner) of recent opens
        self._local = threading.local()  # per-thread LinkStats of the last request

    # -- connection -----------------------------------------------------------------------------

    def connect(self, timeout: float = 10.0) -> None:
        """Connect and subscribe; raises ``BrokerError``/``BrokerAuthError`` with what to fix."""
        self.client.connect(timeout)
        self.client.subscribe(f"{topics.PREFIX}/{self.device}/+/down", handler=self._on_reply)
        self.client.subscribe(topics.STATUS_FILTER, handler=self._on_status)
        self._status_since = time.monotonic()

    def connect_in_background(self, *, first_error: BrokerError | None = None) -> None:
        """The broker was down at start: keep connecting in the background (paho's thread, with
        the client's backoff); ``available()`` stays False until connected and a worker is online.
        Wrong credentials are logged and not retried."""
        if first_error is not None:
            log.warning("%s; retrying in the background", first_error)
        self.client.subscribe(
            f"{topics.PREFIX}/{self.device}/+/down", handler=self._on_reply, when_connected=True
        )
        self.client.subscribe(topics.STATUS_FILTER, handler=self._on_status, when_connected=True)
        self.client.connect_in_background()

    def shutdown(self) -> None:
        self.client.close()

    def broker_connected(self) -> bool:
        """Whether the connection to the broker is up now (metric ``spececd_edge_broker_connected``)."""
        return self.client.connected.is_set()

    def available(self) -> bool:
        """Connected to the broker and at least one worker announces itself ``online``."""
        return self.client.connected.is_set() and bool(self.workers_online())

    def owner_of(self, sid: str) -> str | None:
        """The worker that owns session ``sid`` now (None once closed)."""
        return self._owner.get(sid)

    def workers_online(self) -> list[str]:
        """Workers whose retained status is ``online`` (``loading`` and ``offline`` are not)."""
        with self._workers_cond:
            return sorted(w for w, status in self._workers.items() if status == topics.ONLINE)

    @property
    def last(self) -> LinkStats:
        return getattr(self._local, "stats", LinkStats())

    # -- network thread: resolve or fail futures, never block ----------------------------------

    def _on_reply(self, msg: Incoming) -> None:
        t0 = time.perf_counter()
        try:
            reply = decode(msg.payload)
        except ProtocolError as exc:
            log.warning("undecodable reply on %s dropped: %s", msg.topic, exc)
            return
        dec_ms = (time.perf_counter() - t0) * 1e3
        if reply.sid != msg.topic.rsplit("/", 2)[-2]:
            log.warning("reply on %s names another session (%s): dropped", msg.topic, reply.sid)
            return
        if isinstance(reply, Error):
            self._fail_on_error(reply)
            return
        if isinstance(reply, Opened):
            key: Key = (reply.sid, reply.epoch, OPEN_SEQ, 0)
        elif isinstance(reply, Tokens):
            key = (reply.sid, reply.epoch, reply.seq, reply.part)
        elif isinstance(reply, Verdict):
            key = (reply.sid, reply.epoch, reply.seq, 0)
        else:
            log.warning("unexpected %s on %s dropped", type(reply).__name__, msg.topic)
            return
        self._pending.resolve(key, (reply, len(msg.payload), dec_ms))  # else stale or a duplicate

    def _fail_on_error(self, err: Error) -> None:
        """An ``error`` fails the session's request it names (``seq``), or all of them (no seq)."""

        def exc_for(key: Key, _owner: str | None) -> BaseException | None:
            sid, epoch, seq, _part = key
            if sid != err.sid or (err.epoch is not None and err.epoch != epoch):
                return None
            if err.seq is not None and err.seq != seq:
                return None
            return SessionError(err.code, err.detail, sid=sid)

        if not self._pending.fail(exc_for) and err.seq is None:
            # A session-wide error nobody waits for (e.g. "evicted: re-open it") answers the
            # session's next request; an open forgets it (it belongs to the older epoch).
            with self._workers_cond:
                self._orphans[err.sid] = err
                while len(self._orphans) > 1024:
                    self._orphans.popitem(last=False)

    def _on_status(self, msg: Incoming) -> None:
        worker = msg.topic.rsplit("/", 2)[-2]
        with self._workers_cond:
            self._workers[worker] = msg.payload
            any_online = any(s == topics.ONLINE for s in self._workers.values())
            self._workers_cond.notify_all()
        if msg.payload == topics.ONLINE:
            return
        lost = SessionError("worker_lost", f"worker {worker} went {msg.payload.decode(errors='replace')}")
        none_left = CloudUnavailableError(
            f"no worker answered the open: the last worker online ({worker}) went "
            f"{msg.payload.decode(errors='replace')}"
        )
        self._pending.fail(
            lambda _key, owner: (
                lost if owner == worker else (none_left if owner is None and not any_online else None)
            )
        )

    def _on_broker_lost(self) -> None:
        err = BrokerError(f"lost the broker at {self.client.config.address}")
        self._pending.fail(lambda _key, _owner: err)

    def _statuses_resubscribed(self) -> None:
        self._status_since = time.monotonic()

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

    def _check_workers(self) -> None:
        """Raise ``CloudUnavailableError`` at once when no worker is online (after the retained
        statuses had time to arrive), instead of waiting ``open_timeout_s`` for an answer."""
        with self._workers_cond:
            while not any(s == topics.ONLINE for s in self._workers.values()):
                left = self._status_since + STATUS_GRACE_S - time.monotonic()
                if left <= 0:
                    raise CloudUnavailableError(
                        "no worker answered the open: no worker is online (statuses: "
                        f"{_statuses(self._workers)}); start a worker (`spececd-worker`) on this broker"
                    )
                self._workers_cond.wait(left)

    def open(self, msg: Open) -> Opened:
        if not self.client.connected.is_set():
            raise BrokerError(f"not connected to the broker at {self.client.config.address}")
        self._check_workers()
        with self._workers_cond:
            self._orphans.pop(msg.sid, None)
        key: Key = (msg.sid, msg.epoch, OPEN_SEQ, 0)
        deadline = time.monotonic() + self.open_timeout_s
        up = 0
        while True:
            future = self._pending.add(key, None)
            try:
                more, codec_ms = self._send(topics.open_topic(self.device), msg)
                up += more
                reply, down, dec_ms = future.result(timeout=max(0.0, deadline - time.monotonic()))
                break
            except FutureTimeout:
                raise CloudUnavailableError(
                    f"no worker answered the open within {self.open_timeout_s:.0f} s "
                    f"(workers online: {', '.join(self.workers_online()) or 'none'}); start a worker "
                    "(`spececd-worker`) or check that it subscribes to this broker"
                ) from None
            except SessionError as exc:
                if exc.code != "overloaded" or time.monotonic() + OVERLOADED_RETRY_S >= deadline:
                    raise
                log.info("open of %s refused (%s): sending it again for another worker", msg.sid, exc.detail)
                time.sleep(OVERLOADED_RETRY_S)
            finally:
                self._pending.pop(key)
        self._owner[msg.sid] = reply.worker
        self.history.append((msg.sid, reply.worker))
        self._local.stats = LinkStats(up, down, codec_ms + dec_ms)
        return reply

    def verify(self, msg: Draft) -> Verdict:
        key: Key = (msg.sid, msg.epoch, msg.seq, 0)
        self._pending.add(key, self._owner.get(msg.sid))
        try:
            reply, stats = self._request(msg, key, send=True)
        finally:
            self._pending.pop(key)
        self._local.stats = stats
        return reply

    def decode(self, msg: Decode) -> Iterator[Tokens]:
        """Stream the owner's ``Tokens`` parts; a re-send's replayed parts already seen are dropped."""
        prefix = (msg.sid, msg.epoch, msg.seq)
        self._pending.open_stream(prefix, self._owner.get(msg.sid))
        try:
            part_no, done = 0, False
            while not done:
                key: Key = (*prefix, part_no)
                self._pending.add(key, self._owner.get(msg.sid))
                part, self._local.stats = self._request(msg, key, send=part_no == 0)
                self._pending.pop(key)
                yield part
                part_no, done = part_no + 1, part.done
        finally:
            self._pending.close_stream(prefix)

    def _request(self, msg: Draft | Decode, key: Key, *, send: bool) -> tuple[Any, LinkStats]:
        """Publish (unless continuing a stream), wait with the deadline, re-send once, then give
        the owner up. The future of ``key`` is registered by the caller before the publish, so
        a failure (error, owner offline, broker lost) can never slip in between."""
        owner = self._owner.get(msg.sid)
        with self._workers_cond:
            if owner is not None and self._workers.get(owner, topics.ONLINE) != topics.ONLINE:
                raise SessionError("worker_lost", f"worker {owner} is not online", sid=msg.sid)
            orphan = self._orphans.pop(msg.sid, None) if send else None
        if orphan is not None:
            raise SessionError(orphan.code, orphan.detail, sid=msg.sid)
        topic = topics.up_topic(self.device, msg.sid)
        up, codec_ms = self._send(topic, msg, expiry_s=self.round_timeout_s) if send else (0, 0.0)
        future = self._pending.add(key, owner)
        for attempt in range(2):
            try:
                reply, down, dec_ms = future.result(timeout=self.round_timeout_s)
            except FutureTimeout:
                if attempt == 1:
                    break
                log.info(
                    "no answer to seq %d of %s within %.1f s: re-sending",
                    msg.seq,
                    msg.sid,
                    self.round_timeout_s,
                )
                more, _ = self._send(topic, msg, expiry_s=self.round_timeout_s)
                up += more
                continue
            return reply, LinkStats(up, down, codec_ms + dec_ms)
        raise SessionError("worker_lost", f"worker {owner} did not answer seq {msg.seq} twice", sid=msg.sid)

    def close(self, msg: Close) -> None:
        with contextlib.suppress(BrokerError):  # best effort: idle sessions are evicted anyway
            self._send(topics.up_topic(self.device, msg.sid), msg, response=False)
        self._owner.pop(msg.sid, None)


def _statuses(workers: dict[str, bytes]) -> str:
    return ", ".join(f"{w} {s.decode(errors='replace')}" for w, s in sorted(workers.items())) or "none seen"
