"""The worker's message side: decode, check and queue what arrives; publish answers and errors.

A mixin of ``cloud_worker.worker.Worker`` (split out to keep files small); it runs on the model
thread. Nothing here touches the model: a request that passes these checks is queued on its
session (``cloud_worker.scheduler``) and validated against the session when its turn comes.
"""

from __future__ import annotations

import logging
from typing import Any

from cloud_worker.scheduler import Job
from cloud_worker.support import Owned, safe_parse, same_model_name
from cloud_worker.verifier import session_key
from shared import topics
from shared.errors import ProtocolError, SessionError
from shared.mqtt import Incoming
from shared.protocol import Close, Decode, Draft, Error, Open, Opened, Tokens, Verdict, decode, encode

log = logging.getLogger("cloud_worker.worker")


class Intake:
    """Message handling of a worker (expects the attributes ``Worker.__init__`` sets)."""

    client: Any
    verifier: Any
    scheduler: Any
    metrics: Any
    owned: Any
    bad_messages: Any
    open_rate: Any
    max_owned: int
    target_name: str
    draft_name: str
    _accepting: Any

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
                parsed = safe_parse(msg.response_topic)
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
        if not self.open_rate.allow(device):
            self._count("overloaded")
            self._send_error(
                down, req.sid, "overloaded", "too many opens from this device: wait and open again", None, msg
            )
            return
        key = session_key(device, req.sid)
        if key not in self.owned:
            self.client.subscribe(
                topics.up_topic(device, req.sid), handler=self._enqueue
            )  # waits for the SUBACK
        self.owned[key] = Owned(device=device, sid=req.sid, down=down)
        self.owned.move_to_end(key)
        if not self.scheduler.push(Job(key, device, req.sid, req, down, msg, msg.received_at, prefill=True)):
            self._count("overloaded")
            self._send_error(
                down, req.sid, "overloaded", "too many requests queued for this session", None, msg
            )
            return
        self._trim_owned()

    def _handle_up(self, msg: Incoming, device: str, sid: str) -> None:
        down = topics.down_topic(device, sid)
        key = session_key(device, sid)
        if key not in self.owned:
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
        if isinstance(req, (Draft, Decode)):
            if not self.scheduler.push(Job(key, device, sid, req, down, msg, msg.received_at)):
                self._count("overloaded")
                self._send_error(
                    down, sid, "overloaded", "too many requests queued for this session", req.seq, msg
                )
        elif isinstance(req, Close):
            self.verifier.close(req.sid, req.epoch, device=device)
            if key not in self.verifier.sessions:
                self.scheduler.drop(key)
                self._forget(key)
            self.metrics.session_closed()
            self.metrics.set_sessions(len(self.verifier.sessions))
        else:
            self._count("bad_message")
            self._send_error(down, sid, "bad_message", f"unexpected {type(req).__name__} on up", None, msg)

    def _session_error(
        self, exc: SessionError, down: str, sid: str, seq: int | None, msg: Incoming | None
    ) -> None:
        self._count(exc.code)
        if exc.code == "stale_epoch":
            return  # documented drop: a newer epoch of the session exists, nobody waits for this
        self._send_error(down, sid, exc.code, exc.detail, seq, msg)

    def _refuse(self, job: Job, code: str, detail: str) -> None:
        """Answer a queued request with ``error{code}`` (its seq, on its device's own down topic)."""
        self._send_error(job.down, job.sid, code, detail, getattr(job.msg, "seq", None), job.incoming)

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

    def _forget(self, key: str) -> None:
        owned = self.owned.pop(key, None)
        if owned is not None:
            self._unsubscribe_quietly(topics.up_topic(owned.device, owned.sid))

    def _trim_owned(self) -> None:
        """Unsubscribe the oldest sessions already gone from the verifier (kept a while only to
        answer ``resync``); a live session or one with queued work is never dropped here."""
        while len(self.owned) > self.max_owned:
            key = next(
                (k for k in self.owned if k not in self.verifier.sessions and k not in self.scheduler.queues),
                None,
            )
            if key is None:
                return
            owned = self.owned.pop(key)
            self._unsubscribe_quietly(topics.up_topic(owned.device, owned.sid))

    def _unsubscribe_quietly(self, topic: str) -> None:
        try:
            self.client.unsubscribe(topic)
        except Exception as exc:
            log.info("unsubscribe %s failed: %s", topic, exc)
