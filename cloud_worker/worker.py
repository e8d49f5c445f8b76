"""``spececd-worker``: a cloud worker that owns sessions and verifies drafts over MQTT (DESIGN §2, §5).

Threads: paho's network thread only decodes nothing and enqueues (``on_message`` never does model
work); one model thread takes jobs in arrival order and runs the verifier.

Ownership: an ``open`` reaches one worker through the shared subscription. That worker
subscribes to the session's ``up`` topic, waits for the SUBACK, prefills, and only then answers
``opened``. The device is always taken from the topic (the broker's ACL authenticates it).

Bad input (documented in docs/ARCHITECTURE.md, "Worker: bad input"): every malformed or
unserviceable message is counted in ``bad_messages`` by code and answered with an ``error`` on
the device's own ``down`` topic when the session id is known; when it is not (undecodable
payload on ``open``), the message is dropped and counted. Stale epochs are dropped and counted.
"""

from __future__ import annotations

import logging
import queue
import signal
import threading
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import Any

from cloud_worker.verifier import DEFAULT_MAX_SESSIONS, Verifier
from shared import topics
from shared.errors import ProtocolError, SessionError
from shared.models import LoadedModel
from shared.mqtt import BrokerConfig, Incoming, MqttClient, Will, make_client
from shared.protocol import Close, Decode, Draft, Error, Open, Opened, Tokens, Verdict, decode, encode

log = logging.getLogger(__name__)

DRAIN_TIMEOUT_S = 30.0
_STOP = object()  # sentinel job: the model thread exits


class _NullMetrics:
    """Stands in for ``shared.metrics.WorkerMetrics`` when metrics are off."""

    def __getattr__(self, _name: str) -> Any:
        return lambda *a, **k: None


@dataclass(frozen=True, slots=True)
class _Owned:
    device: str
    down: str


def same_model_name(a: str, b: str) -> bool:
    """Model names match when either is empty or their last path part agrees (case-insensitive).

    The edge names models by hub id, folder or file; ``Qwen/Qwen2.5-1.5B`` and
    ``/models/qwen2.5-1.5b`` name the same model."""
    if not a or not b:
        return True
    last = lambda s: s.rstrip("/").rsplit("/", 1)[-1].removesuffix(".gguf").lower()  # noqa: E731
    return last(a) == last(b)


class Worker:
    """One worker process: a target model, its sessions, and an MQTT client."""

    def __init__(
        self,
        target: LoadedModel,
        broker: BrokerConfig,
        *,
        worker_id: str,
        target_name: str | None = None,
        draft_name: str = "",
        max_sessions: int = DEFAULT_MAX_SESSIONS,
        metrics: Any = None,
    ) -> None:
        self.worker_id = topics.check_worker(worker_id)
        self.verifier = Verifier(target, worker_id=worker_id, max_sessions=max_sessions)
        self.target_name = target_name or target.name
        self.draft_name = draft_name
        self.metrics = metrics or _NullMetrics()
        self.bad_messages: Counter[str] = Counter()
        self.jobs: queue.Queue[Any] = queue.Queue()
        self.owned: OrderedDict[str, _Owned] = OrderedDict()  # sid -> where it lives
        self.max_owned = 4 * max_sessions  # evicted sessions stay subscribed a while to answer `resync`
        self.status_topic = topics.status_topic(worker_id)
        self.client: MqttClient = make_client(
            broker,
            client_id=broker.username or worker_id,
            will=Will(self.status_topic, topics.OFFLINE, retain=True),
        )
        self._accepting = threading.Event()
        self._thread: threading.Thread | None = None
        self._stopped = threading.Event()

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        """Connect, take opens through the shared subscription, announce ``online``."""
        self.client.connect()
        self.client.on_reconnect.append(self._announce_online)
        self._thread = threading.Thread(target=self._model_loop, name=f"model-{self.worker_id}", daemon=True)
        self._thread.start()
        self._accepting.set()
        self.client.subscribe(topics.OPEN_SHARED_FILTER, handler=self._enqueue)
        self._announce_online()
        log.info(
            "worker %s online: target %s, max %d sessions",
            self.worker_id,
            self.target_name,
            self.verifier.max_sessions,
        )

    def _announce_online(self) -> None:
        self.client.publish(self.status_topic, topics.ONLINE, retain=True, content_type=None)

    def stop(self, *, drain_timeout: float = DRAIN_TIMEOUT_S) -> None:
        """Graceful shutdown: stop taking opens, finish queued rounds, tell owned sessions to
        re-open elsewhere, publish ``offline``, disconnect."""
        if self._stopped.is_set():
            return
        self._accepting.clear()
        try:
            self.client.unsubscribe(topics.OPEN_SHARED_FILTER)
        except Exception as exc:  # the broker may be gone; draining still matters
            log.warning("unsubscribe from opens failed during shutdown: %s", exc)
        self.jobs.put(_STOP)
        if self._thread is not None:
            self._thread.join(drain_timeout)
        for sid, owned in list(self.owned.items()):
            if sid in self.verifier.sessions:
                self._send_error(owned.down, sid, "resync", "worker shutting down: re-open the session", None)
        try:
            self.client.publish(self.status_topic, topics.OFFLINE, retain=True, content_type=None, wait=True)
        except Exception as exc:
            log.warning("could not publish offline status: %s", exc)
        self.client.close()
        self._stopped.set()
        log.info("worker %s stopped", self.worker_id)

    # -- network thread: enqueue only ----------------------------------------------------------

    def _enqueue(self, msg: Incoming) -> None:
        self.jobs.put(msg)
        self.metrics.set_queue_depth(self.jobs.qsize())

    # -- model thread ---------------------------------------------------------------------------

    def _model_loop(self) -> None:
        while True:
            job = self.jobs.get()
            if job is _STOP:
                return
            self.metrics.set_queue_depth(self.jobs.qsize())
            try:
                self._handle(job)
            except Exception:  # one bad message must never take the worker down
                log.exception("unexpected error on %s", job.topic)
                self._count("internal")

    def _count(self, code: str) -> None:
        self.bad_messages[code] += 1
        self.metrics.bad_message(code)

    def _handle(self, msg: Incoming) -> None:
        try:
            where = topics.parse_topic(msg.topic)
        except ProtocolError:
            self._count("bad_topic")
            return
        if where.kind == "open":
            self._handle_open(msg, where.device)
        elif where.kind == "up":
            self._handle_up(msg, where.device, where.sid)
        else:
            self._count("bad_topic")

    def _decode_or_reply(self, msg: Incoming, device: str, sid: str | None) -> Any:
        """Decode a payload; on failure count it and answer ``bad_message`` where we can."""
        try:
            return decode(msg.payload)
        except ProtocolError as exc:
            self._count("bad_message")
            if sid is None and msg.response_topic:  # an open: trust only the device's own down topic
                parsed = _safe_parse(msg.response_topic)
                if parsed is not None and parsed.kind == "down" and parsed.device == device:
                    sid = parsed.sid
            if sid is not None:
                self._send_error(topics.down_topic(device, sid), sid, "bad_message", str(exc), None, msg)
            return None

    def _handle_open(self, msg: Incoming, device: str) -> None:
        req = self._decode_or_reply(msg, device, None)
        if req is None:
            return
        down = topics.down_topic(device, req.sid)  # every message type carries its session id
        if not isinstance(req, Open):
            self._count("bad_message")
            self._send_error(down, req.sid, "bad_message", "expected an open", None, msg)
            return
        if not self._accepting.is_set():
            self._send_error(down, req.sid, "overloaded", "worker shutting down: open again", None, msg)
            return
        if not (
            same_model_name(req.target_model, self.target_name)
            and same_model_name(req.draft_model, self.draft_name)
        ):
            self._count("model_mismatch")
            detail = f"this worker serves target {self.target_name!r} for draft {self.draft_name or 'any'!r}; asked for target {req.target_model!r} with draft {req.draft_model!r}"
            self._send_error(down, req.sid, "model_mismatch", detail, None, msg)
            return
        up = topics.up_topic(device, req.sid)
        if req.sid not in self.owned:
            self.client.subscribe(up, handler=self._enqueue)  # waits for the SUBACK
        self.owned[req.sid] = _Owned(device=device, down=down)
        self.owned.move_to_end(req.sid)
        self._trim_owned()
        try:
            opened = self.verifier.open(req)
        except SessionError as exc:
            self._session_error(exc, down, req.sid, None, msg)
            return
        self.metrics.session_opened()
        self.metrics.set_sessions(len(self.verifier.sessions))
        self._publish(down, opened, msg)

    def _handle_up(self, msg: Incoming, device: str, sid: str) -> None:
        down = topics.down_topic(device, sid)
        owned = self.owned.get(sid)
        if owned is None or owned.device != device:
            self._count("unknown_session")
            self._send_error(down, sid, "resync", "this worker does not own the session: open it", None, msg)
            return
        req = self._decode_or_reply(msg, device, sid)
        if req is None:
            return
        if getattr(req, "sid", None) != sid:
            self._count("bad_message")
            self._send_error(
                down, sid, "bad_message", "the message's sid differs from its topic's", None, msg
            )
            return
        queue_ms = (time.perf_counter() - msg.received_at) * 1e3
        try:
            if isinstance(req, Draft):
                replayed = req.seq == getattr(self.verifier.sessions.get(sid), "last_seq", None)
                verdict = self.verifier.verify(req, queue_ms=queue_ms)
                if replayed:
                    self.metrics.replayed()
                else:
                    self.metrics.verified(
                        len(req.tok), verdict.n_acc, verdict.verify_ms / 1e3, queue_ms / 1e3
                    )
                self._publish(down, verdict, msg)
            elif isinstance(req, Decode):
                self.verifier.decode(req, lambda part: self._publish_part(down, part, msg), queue_ms=queue_ms)
            elif isinstance(req, Close):
                self.verifier.close(req.sid, req.epoch)
                self._forget(sid)
                self.metrics.session_closed()
            else:
                self._count("bad_message")
                self._send_error(
                    down, sid, "bad_message", f"unexpected {type(req).__name__} on up", None, msg
                )
        except SessionError as exc:
            self._session_error(exc, down, sid, getattr(req, "seq", None), msg)
        self.metrics.set_sessions(len(self.verifier.sessions))

    def _publish_part(self, down: str, part: Tokens, msg: Incoming) -> None:
        self.metrics.decoded(len(part.tok), part.verify_ms / 1e3)
        self._publish(down, part, msg)

    def _session_error(self, exc: SessionError, down: str, sid: str, seq: int | None, msg: Incoming) -> None:
        self._count(exc.code)
        if exc.code == "stale_epoch":
            return  # documented drop: a newer epoch of the session exists, nobody waits for this
        self._send_error(down, sid, exc.code, exc.detail, seq, msg)

    def _send_error(
        self, down: str, sid: str, code: str, detail: str, seq: int | None, msg: Incoming | None = None
    ) -> None:
        self._publish(down, Error(sid=sid, code=code, detail=detail[:4000], seq=seq, epoch=None), msg)

    def _publish(self, down: str, reply: Opened | Verdict | Tokens | Error, msg: Incoming | None) -> None:
        corr = msg.correlation_data if msg is not None else None
        try:
            self.client.publish(down, encode(reply), correlation_data=corr)
        except Exception as exc:  # broker down: the edge's deadline and retry cover the loss
            log.warning("could not publish %s to %s: %s", type(reply).__name__, down, exc)

    def _forget(self, sid: str) -> None:
        owned = self.owned.pop(sid, None)
        if owned is not None:
            self._unsubscribe_quietly(topics.up_topic(owned.device, sid))

    def _trim_owned(self) -> None:
        while len(self.owned) > self.max_owned:
            sid, owned = self.owned.popitem(last=False)
            self.verifier.evict(sid)
            self._unsubscribe_quietly(topics.up_topic(owned.device, sid))

    def _unsubscribe_quietly(self, topic: str) -> None:
        try:
            self.client.unsubscribe(topic)
        except Exception as exc:
            log.info("unsubscribe %s failed: %s", topic, exc)


def _safe_parse(topic: str):
    try:
        return topics.parse_topic(topic)
    except ProtocolError:
        return None


def install_sigterm(worker: Worker) -> threading.Event:
    """SIGTERM/SIGINT → graceful ``stop``; returns an event set when the worker has stopped."""
    done = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        log.info("signal %d: draining", signum)
        threading.Thread(target=lambda: (worker.stop(), done.set()), daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    return done
