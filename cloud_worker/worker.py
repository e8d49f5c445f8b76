"""``spececd-worker``: a cloud worker that owns sessions and verifies drafts over MQTT (DESIGN §2, §5).

Threads: paho's network thread only enqueues (``on_message`` never does model work). One model
thread loops: take every message that has arrived (decode, check, queue it on its session:
``cloud_worker.scheduler``), then run ONE target forward over the next jobs of many sessions
(``Verifier.run``), publish the answers, and go round again. It never waits for a batch to fill;
with ``batch_window_ms`` > 0 it waits up to that long for the sessions the last forward answered
(default "auto": for those it expects back within half a forward; 0: take what is queued).

Ownership: an ``open`` reaches one worker through the shared subscription. That worker
subscribes to the session's ``up`` topic, waits for the SUBACK, prefills, and only then answers
``opened``. The device is always taken from the topic (the broker's ACL authenticates it), and
sessions are keyed by (device, sid): an open from one device never touches another's session.

Bad input (documented in docs/ARCHITECTURE.md, "Worker: bad input"): every malformed or
unserviceable message is counted in ``bad_messages`` by code and answered with an ``error`` on
the device's own ``down`` topic when the session id is known; when it is not (undecodable
payload on ``open``), the message is dropped and counted. Stale epochs are dropped and counted.
Evicted sessions are answered ``error{resync}`` at once, never left to the edge's deadline.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter, OrderedDict
from typing import Any

from cloud_worker.intake import Intake
from cloud_worker.quotas import OpenRate
from cloud_worker.scheduler import Job, Scheduler
from cloud_worker.support import NullMetrics, Owned, install_sigterm, same_model_name
from cloud_worker.verifier import DEFAULT_MAX_SESSIONS, Step, Verifier
from shared import topics
from shared.errors import SessionError
from shared.models import LoadedModel
from shared.mqtt import BrokerConfig, Incoming, MqttClient, Will, make_client
from shared.protocol import Decode, Draft, Error, Opened, Tokens, Verdict

log = logging.getLogger(__name__)

__all__ = ["Worker", "install_sigterm", "same_model_name"]

DRAIN_TIMEOUT_S = 30.0
REJOIN_AUTO = "auto"  # batch_window_ms: wait for the sessions expected back soon (``_await_rejoin``)
FAIR_WAIT_MS = 20.0  # the most the model waits for a device owed model time (``_await_rejoin``)
_STOP = object()  # sentinel: the model thread finishes queued work, then exits


class Worker(Intake):
    """One worker process: a target model, its sessions, and an MQTT client.

    ``max_batch_sessions=1`` gives the unbatched worker (one session per forward, as before
    batching); every other knob is described in docs/ARCHITECTURE.md."""

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
        max_batch_tokens: int = 512,
        max_batch_sessions: int = 32,
        batch_window_ms: float | str = "auto",
        width_rule: str = "ratio",
        batch_layout: str = "padded",
        shared_prefill_tokens: int | str = "auto",
        fair_wait_ms: float = FAIR_WAIT_MS,
        max_cached_tokens: int = 1 << 20,
        max_sessions_per_device: int = 0,
        max_opens_per_s_per_device: float = 20.0,
        client: MqttClient | None = None,
    ) -> None:
        self.worker_id = topics.check_worker(worker_id)
        self.verifier = Verifier(
            target,
            worker_id=worker_id,
            max_sessions=max_sessions,
            max_cached_tokens=max_cached_tokens,
            max_sessions_per_device=max_sessions_per_device,
            batch_layout=batch_layout,
        )
        self.scheduler = Scheduler(
            max_tokens=max_batch_tokens,
            max_sessions=max_batch_sessions,
            width_rule=width_rule,
            packed=batch_layout == "packed",
            shared_prefill=None if shared_prefill_tokens == "auto" else int(shared_prefill_tokens),
        )
        self.rejoin_auto = batch_window_ms == REJOIN_AUTO
        self.batch_window_s = 0.0 if self.rejoin_auto else max(0.0, float(batch_window_ms)) / 1e3
        self.fair_wait_s = max(0.0, fair_wait_ms) / 1e3
        self._answered_keys: set[str] = set()  # sessions the last forward answered (``_await_rejoin``)
        self.open_rate = OpenRate(max_opens_per_s_per_device, burst=max(max_opens_per_s_per_device, 1.0))
        self.target_name = target_name or target.name
        self.draft_name = draft_name
        self.metrics = metrics or NullMetrics()
        self.bad_messages: Counter[str] = Counter()
        self.jobs: queue.Queue[Any] = queue.Queue()
        self.owned: OrderedDict[str, Owned] = OrderedDict()  # session key -> where it lives
        self.max_owned = 4 * max_sessions  # evicted sessions stay subscribed a while to answer `resync`
        self.status_topic = topics.status_topic(worker_id)
        self._connected_early = client is not None  # by connect_early(), before the model loaded
        self.client: MqttClient = client or make_client(
            broker,
            client_id=broker.username or worker_id,
            will=Will(self.status_topic, topics.OFFLINE, retain=True),
        )
        self._accepting = threading.Event()
        self._thread: threading.Thread | None = None
        self._stopped = threading.Event()
        self._stopping = False

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        """Connect (unless ``connect_early`` did), take opens through the shared subscription,
        announce ``online``."""
        if not self._connected_early:
            self.client.connect()
        self.client.on_reconnect.append(self._announce_online)
        self._thread = threading.Thread(target=self._model_loop, name=f"model-{self.worker_id}", daemon=True)
        self._thread.start()
        self._accepting.set()
        self.client.subscribe(topics.OPEN_SHARED_FILTER, handler=self._enqueue)
        self._announce_online()
        log.info(
            "worker %s online: target %s, max %d sessions, %d per forward",
            self.worker_id,
            self.target_name,
            self.verifier.max_sessions,
            self.scheduler.max_sessions,
        )

    def ready(self) -> bool:
        """Whether this worker can serve now: started (model loaded) and connected to the broker."""
        return self._accepting.is_set() and self.client.connected.is_set()

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
        for key, owned in list(self.owned.items()):
            if key in self.verifier.sessions:
                self._send_error(
                    owned.down, owned.sid, "resync", "worker shutting down: re-open the session", None
                )
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
        self.metrics.set_queue_depth(self.jobs.qsize() + len(self.scheduler))

    # -- model thread ---------------------------------------------------------------------------

    def _model_loop(self) -> None:
        while True:
            if not len(self.scheduler):  # idle: block for the next message
                if self._stopping:
                    return
                self._intake(self.jobs.get())
            if not self._stopping:  # draining: finish what was queued before the stop, take nothing new
                self._drain_intake()
            if self._answered_keys and len(self.scheduler) and not self._stopping:
                self._await_rejoin()
            self.metrics.set_queue_depth(self.jobs.qsize() + len(self.scheduler))
            try:
                self._forward_once()
            except Exception:  # one bad batch must never take the worker down
                log.exception("unexpected error in the model loop")
                self._count("internal")

    def _await_rejoin(self) -> None:
        """Wait briefly for sessions the last forward answered to send their next request.

        - ``batch_window_ms`` > 0: up to that long for all of them, so that sessions answered
          together are verified together (without it a saturated fleet splits into cohorts that
          take turns: each forward holds the sessions whose request arrived while the previous one
          ran, and those it answers come back just too late).
        - ``batch_window_ms = "auto"``: for those the worker expects back within half a mean
          forward, from each session's own answer-to-request gaps (``Scheduler.rejoining``),
          as long as the slowest of them is expected. Edges that draft before they reply (a
          torch draft: γ · 100–200 ms) come back after any fixed window of a few ms.
        - Always, for those whose device is owed model time (``Scheduler.owed``): up to
          ``fair_wait_ms``, at most a quarter of a mean forward, so a device between rounds does
          not lose its turn to an expensive forward of a device that is ahead.

        Returns as soon as the awaited sessions are all back, a new session of the same device
        standing in for one that is not (an edge's next generation opens a new session)."""
        answered, self._answered_keys = self._answered_keys, set()
        if self.batch_window_s:
            awaited, window = answered, self.batch_window_s
        else:
            awaited = self.scheduler.owed(answered)
            window = min(self.fair_wait_s, 0.25 * self.scheduler.forward_s) if awaited else 0.0
            if self.rejoin_auto:
                back, wait = self.scheduler.rejoining(answered)
                awaited, window = awaited | back, max(window, wait)
        start = time.monotonic()
        deadline = start + window
        before = set(self.scheduler.queues)
        while (
            self.scheduler.missing(awaited, before)
            and len(self.scheduler) < self.scheduler.max_sessions
            and time.monotonic() < deadline
            and not self._stopping
        ):
            try:
                self._intake(self.jobs.get(timeout=max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                break
        missing = self.scheduler.missing(awaited, before)
        if self.rejoin_auto and missing:
            # waited for in vain: the wait is charged to their devices' model time (Scheduler.rejoining)
            self.scheduler.charge_wait(missing, time.monotonic() - start)
        if awaited and log.isEnabledFor(logging.DEBUG):
            log.debug(
                "rejoin wait %.1f ms of %.1f for %d sessions, missing %s",
                (time.monotonic() - start) * 1e3,
                window * 1e3,
                len(awaited),
                " ".join(sorted(missing)) or "none",
            )

    def _drain_intake(self) -> None:
        while True:
            try:
                self._intake(self.jobs.get_nowait())
            except queue.Empty:
                return

    def _intake(self, msg: Any) -> None:
        if msg is _STOP:
            self._stopping = True
            return
        try:
            self._handle(msg)
        except Exception:  # one bad message must never take the worker down
            log.exception("unexpected error on %s", getattr(msg, "topic", "?"))
            self._count("internal")

    def _forward_once(self) -> None:
        debug = log.isEnabledFor(logging.DEBUG)
        if debug:  # model time of the devices with work, before the choice
            vt = self.scheduler.vtime
            model_time = " ".join(f"{d}={vt.get(d, 0.0):.2f}" for d, t in self.scheduler.devices.items() if t)
        batch = self.scheduler.select(self._prepare)
        if not batch:
            return
        now = time.perf_counter()
        pos_ms, row_med = self.scheduler.pos_ms, self.scheduler.row_med
        for job, step in batch:  # from arrival (or the session's previous step) to this forward
            step.pos_ms, step.row_med = pos_ms, row_med
            self.metrics.queue_wait(now - job.received_at)
            # what the answer reports: the turns it waited included
            step.queue_ms = (now - job.received_at) * 1e3
        rows = self.scheduler.last_rows  # charge() below clears them
        left = set(self.scheduler.queues) if debug else set()
        started = time.perf_counter()
        try:
            results = self.verifier.run([step for _, step in batch])
        except Exception as exc:  # the sessions are as they were: their edges may retry
            self.scheduler.charge(time.perf_counter() - started, measured=False)
            log.exception("target forward over %d sessions failed", len(batch))
            for job, _ in batch:
                self._count("internal")
                self._send_error(
                    job.down,
                    job.sid,
                    "internal",
                    f"target forward failed: {exc}",
                    getattr(job.msg, "seq", None),
                    job.incoming,
                )
            return
        elapsed = time.perf_counter() - started
        self.scheduler.charge(elapsed)
        if debug:
            log.debug(
                "forward %.0f ms, session:positions:queue ms %s; left queued %s; model time %s",
                elapsed * 1e3,
                " ".join(
                    f"{job.key}:{k}{'p' if job.prefill else ''}:{step.queue_ms:.0f}"
                    for (job, step), (_, k) in zip(batch, rows, strict=True)
                ),
                " ".join(sorted(left)) or "none",
                model_time,
            )
        jobs = dict((id(step), job) for job, step in batch)
        self._answered_keys = {job.key for job, step in batch if not step.more}
        self.metrics.forward(
            len(batch), results[0][0].batch_pos if results else 0, self.scheduler.padded(rows)
        )
        for step, replies in results:
            job = jobs[id(step)]
            for reply in replies:
                self._answered(job, reply)
            if step.more:
                job.step, job.received_at = step, time.perf_counter()
                self.scheduler.push(job, front=True)
        self.scheduler.answered(self._answered_keys, time.perf_counter())  # each one's return gap
        self._answer_evicted()
        self.metrics.set_sessions(len(self.verifier.sessions))

    def _prepare(self, job: Job) -> Step | None:
        """Validate ``job`` (scheduler callback); answer it and return None when it needs no forward."""
        if job.step is not None:  # a continuing decode / prefill: is its session still here?
            if job.prefill or self.verifier.sessions.get(job.key) is job.step.sess:
                return job.step
            self._refuse(job, "resync", "session evicted: re-open it")
            return None
        queue_ms = (time.perf_counter() - job.received_at) * 1e3
        try:
            prepared = self.verifier.prepare(job.msg, device=job.device, queue_ms=queue_ms)
        except SessionError as exc:
            self._session_error(exc, job.down, job.sid, getattr(job.msg, "seq", None), job.incoming)
            return None
        if isinstance(prepared, list):  # a repeated seq, or an open with nothing to prefill
            if isinstance(job.msg, (Draft, Decode)):
                self.metrics.replayed()
            for reply in prepared:
                self._answered(job, reply, replay=isinstance(job.msg, (Draft, Decode)))
            self._answer_evicted()
            return None
        job.step = prepared
        return prepared

    def _answered(self, job: Job, reply: Any, *, replay: bool = False) -> None:
        if isinstance(reply, Error):
            self._count(reply.code)
        elif isinstance(reply, Opened):
            self.metrics.session_opened()
        elif isinstance(reply, Verdict) and not replay:
            self.metrics.verified(len(job.msg.tok), reply.n_acc, reply.verify_ms / 1e3, reply.queue_ms / 1e3)
        elif isinstance(reply, Tokens) and not replay:
            self.metrics.decoded(len(reply.tok), reply.verify_ms / 1e3)
        self._publish(job.down, reply, job.incoming)

    def _answer_evicted(self) -> None:
        """Tell every evicted session at once (its queued requests too), never by deadline."""
        while self.verifier.evicted:
            key, sess = self.verifier.evicted.popleft()
            self.metrics.evicted()
            owned = self.owned.get(key)
            down = owned.down if owned is not None else None
            pending = self.scheduler.drop(key)
            for job in pending:
                self._refuse(job, "resync", "session evicted: re-open it")
            if down is not None and not pending:
                self._send_error(down, sess.sid, "resync", "session evicted to make room: re-open it", None)


def connect_early(broker: BrokerConfig, *, worker_id: str) -> MqttClient:
    """Connect before the model loads and retain the status ``loading`` (edges do not count the
    worker as available yet): a wrong broker address or password fails at once, not after a long
    load. Pass the client to ``Worker(client=...)``; its Will says ``offline``."""
    status = topics.status_topic(topics.check_worker(worker_id))
    client = make_client(
        broker, client_id=broker.username or worker_id, will=Will(status, topics.OFFLINE, retain=True)
    )
    client.connect()
    client.publish(status, topics.LOADING, retain=True, content_type=None, wait=True)
    return client
