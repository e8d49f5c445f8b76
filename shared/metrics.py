"""Prometheus metrics of both sides: ``EdgeMetrics`` (the agent) and ``WorkerMetrics`` (a worker).

Names follow Prometheus conventions: ``spececd_edge_*`` / ``spececd_worker_*``, base units
(seconds, bytes), counters end in ``_total``. No label ever carries a session id, device or
prompt: every label has a small fixed set of values (``position`` is 0..63, ``mode`` is one of
the generation modes, ``code`` is a short error code, ``source`` a token source).

Each object owns a ``CollectorRegistry`` (a fresh one unless one is passed), so several
agents or workers in one process (tests, the benchmark) never collide. ``render()`` gives the
text exposition format for an HTTP ``/metrics`` handler; ``WorkerMetrics.serve`` starts
prometheus_client's own HTTP server for a worker.
"""

from __future__ import annotations

import re
import threading
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
    start_http_server,
)

# A `_created` series per counter and histogram doubles the series count and no dashboard uses
# them (process-wide switch of prometheus_client; SpecECD's processes have no other metrics).
disable_created_metrics()

__all__ = ["CONTENT_TYPE_LATEST", "MAX_POSITION", "EdgeMetrics", "WorkerMetrics"]

MAX_POSITION = 63  # gamma <= 64, so draft positions are 0..63
MAX_CODES = 32  # distinct ``code`` label values kept before the rest count as "other"
_CODE_RE = re.compile(r"^[a-z][a-z0-9_]{0,31}$")

# Round trips over MQTT take milliseconds to a second; model work on a CPU can take seconds.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)  # sessions per forward
POSITION_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)  # positions per forward
GAMMA_BUCKETS = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 24, 32, 64)  # draft tokens per round
GENERATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


def _build_info(name: str, registry: CollectorRegistry) -> Info:
    """``<name>_info{version, python} 1``: which build is running (join it onto other series)."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    try:
        ver = version("spececd")
    except PackageNotFoundError:
        ver = "0+unknown"
    info = Info(name, "The SpecECD version and Python of this process.", registry=registry)
    info.info({"version": ver, "python": platform.python_version()})
    return info


def _broker_gauge(name: str, registry: CollectorRegistry) -> Gauge:
    gauge = Gauge(name, "1 while the MQTT connection to the broker is up, else 0.", registry=registry)
    gauge.set(0)
    return gauge


def _watch(gauge: Gauge, connected: Any) -> None:
    """Make ``gauge`` read ``connected()`` at each scrape (0 when it raises)."""

    def read() -> float:
        try:
            return 1.0 if connected() else 0.0
        except Exception:
            return 0.0

    gauge.set_function(read)


def _own_registry(registry: CollectorRegistry | None) -> CollectorRegistry:
    """``registry``, or a fresh one with the process and platform collectors."""
    if registry is not None:
        return registry
    registry = CollectorRegistry(auto_describe=True)
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    return registry


class _Codes:
    """Keeps a label's value set bounded: unknown-looking or surplus codes become ``other``."""

    def __init__(self) -> None:
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, code: str) -> str:
        code = str(code)
        if not _CODE_RE.match(code):
            return "other"
        with self._lock:
            if code in self._seen:
                return code
            if len(self._seen) >= MAX_CODES:
                return "other"
            self._seen.add(code)
            return code


class WorkerMetrics:
    """Metrics of one cloud worker. The worker calls the methods; ``serve`` exposes them."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = r = _own_registry(registry)
        self._codes = _Codes()
        p = "spececd_worker_"
        self.sessions = Gauge(p + "sessions", "Sessions whose KV cache this worker holds now.", registry=r)
        self.sessions_opened = Counter(p + "sessions_opened", "Sessions opened (or re-opened).", registry=r)
        self.sessions_closed = Counter(p + "sessions_closed", "Sessions closed by their edge.", registry=r)
        self.verifications = Counter(p + "verifications", "Draft blocks verified.", registry=r)
        self.drafted = Counter(p + "drafted_tokens", "Draft tokens received for verification.", registry=r)
        self.accepted = Counter(p + "accepted_tokens", "Draft tokens accepted.", registry=r)
        self.verify_seconds = Histogram(
            p + "verify_seconds",
            "Target forward + acceptance per block.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_seconds = Histogram(
            p + "queue_seconds", "Wait before model work per request.", buckets=LATENCY_BUCKETS, registry=r
        )
        self.decoded_tokens = Counter(p + "decoded_tokens", "Tokens decoded by the target alone.", registry=r)
        self.decode_seconds = Histogram(
            p + "decode_seconds", "Target-only decode time per request.", buckets=LATENCY_BUCKETS, registry=r
        )
        self.bad_messages = Counter(
            p + "bad_messages", "Messages answered with an error, by code.", ["code"], registry=r
        )
        self.replays = Counter(p + "replays", "Duplicate requests answered from the reply cache.", registry=r)
        self.evictions = Counter(p + "evictions", "Sessions evicted (LRU bound or idle).", registry=r)
        self.queue_depth = Gauge(p + "queue_depth", "Requests waiting for the model now.", registry=r)
        self.forward_sessions = Histogram(
            p + "forward_sessions", "Sessions in one target forward.", buckets=BATCH_BUCKETS, registry=r
        )
        self.forward_positions = Histogram(
            p + "forward_positions",
            "Positions (tokens fed) in one target forward.",
            buckets=POSITION_BUCKETS,
            registry=r,
        )
        self.forward_padded = Histogram(
            p + "forward_padded",
            "Padded positions (rows x widest row: what the forward computes) in one target forward.",
            buckets=POSITION_BUCKETS,
            registry=r,
        )
        self.queue_wait_seconds = Histogram(
            p + "queue_wait_seconds",
            "Wait of a request (or of a decode's next step) from arrival to its forward.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.build = _build_info(p + "build", r)
        self.broker_connected = _broker_gauge(p + "broker_connected", r)
        self.ready = Gauge(
            p + "ready",
            "1 when the worker can serve: connected to the broker and its model loaded, else 0.",
            registry=r,
        )

    def watch_broker(self, connected: Any) -> None:
        """Read ``spececd_worker_broker_connected`` from ``connected()`` at each scrape."""
        _watch(self.broker_connected, connected)

    def watch_ready(self, ready: Any) -> None:
        """Read ``spececd_worker_ready`` (the container healthcheck's signal) from ``ready()``."""
        _watch(self.ready, ready)

    def session_opened(self) -> None:
        """A session was opened or re-opened (a new epoch) on this worker."""
        self.sessions_opened.inc()

    def session_closed(self) -> None:
        """A session was closed by its edge."""
        self.sessions_closed.inc()

    def set_sessions(self, n: int) -> None:
        """How many sessions this worker holds now."""
        self.sessions.set(n)

    def verified(self, gamma: int, n_acc: int, verify_s: float, queue_s: float) -> None:
        """One draft block of ``gamma`` tokens judged, ``n_acc`` accepted."""
        self.verifications.inc()
        self.drafted.inc(gamma)
        self.accepted.inc(n_acc)
        self.verify_seconds.observe(verify_s)
        self.queue_seconds.observe(queue_s)

    def decoded(self, tokens: int, seconds: float) -> None:
        """One cloud-only decode request: ``tokens`` produced in ``seconds``."""
        self.decoded_tokens.inc(tokens)
        self.decode_seconds.observe(seconds)

    def bad_message(self, code: str) -> None:
        """A request answered with an ``error`` message of ``code`` (e.g. ``bad_message``)."""
        self.bad_messages.labels(code=self._codes(code)).inc()

    def replayed(self) -> None:
        """A duplicate request (retry) answered from the reply cache."""
        self.replays.inc()

    def evicted(self) -> None:
        """A session's KV cache was evicted."""
        self.evictions.inc()

    def forward(self, sessions: int, positions: int, padded: int | None = None) -> None:
        """One target forward over ``sessions`` sessions and ``positions`` tokens fed, padded to
        ``padded`` positions (rows × widest row; the same as ``positions`` for one row)."""
        self.forward_sessions.observe(sessions)
        self.forward_positions.observe(positions)
        self.forward_padded.observe(positions if padded is None else padded)

    def queue_wait(self, seconds: float) -> None:
        """A request (or a decode's next step) waited ``seconds`` for its forward."""
        self.queue_wait_seconds.observe(seconds)

    def set_queue_depth(self, n: int) -> None:
        """Requests waiting for the model now."""
        self.queue_depth.set(n)

    def render(self) -> bytes:
        """The metrics in the Prometheus text format."""
        return generate_latest(self.registry)

    def serve(self, host: str, port: int) -> tuple[Any, threading.Thread]:
        """Serve ``/metrics`` on ``host:port`` (a daemon thread); returns (server, thread).

        Stop it with ``server.shutdown(); server.server_close()``. Port 0 picks a free port:
        read it from ``server.server_port``.
        """
        return start_http_server(port, addr=host, registry=self.registry)


class EdgeMetrics:
    """Metrics of one edge agent. ``attach(agent)`` makes it observe every round and generation;
    the HTTP API sets the in-flight and queue gauges and counts requests."""

    MODES = ("speculative", "cloud-only", "edge-only")
    SOURCES = ("draft", "target", "edge", "fallback")

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = r = _own_registry(registry)
        p = "spececd_edge_"
        self.rounds = Counter(
            p + "rounds", "Round trips to the verifier (draft blocks or decode parts).", registry=r
        )
        self.drafted = Counter(p + "drafted_tokens", "Draft tokens sent for verification.", registry=r)
        self.judged = Counter(p + "judged_tokens", "Draft positions the target judged.", registry=r)
        self.accepted = Counter(p + "accepted_tokens", "Draft tokens the target accepted.", registry=r)
        self.position_judged = Counter(
            p + "position_judged",
            "Judged draft tokens by position in the block (0..63).",
            ["position"],
            registry=r,
        )
        self.position_accepted = Counter(
            p + "position_accepted",
            "Accepted draft tokens by position in the block (0..63).",
            ["position"],
            registry=r,
        )
        self.round_seconds = Histogram(
            p + "round_seconds",
            "Wall time of one verify/decode call on the link.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.draft_seconds = Histogram(
            p + "draft_seconds", "Time to draft one block on the edge.", buckets=LATENCY_BUCKETS, registry=r
        )
        self.verify_seconds = Histogram(
            p + "verify_seconds", "Worker-reported model time per round.", buckets=LATENCY_BUCKETS, registry=r
        )
        self.gamma = Histogram(
            p + "gamma",
            "Draft tokens proposed per speculative round (γ chosen).",
            buckets=GAMMA_BUCKETS,
            registry=r,
        )
        self.gamma_predicted_tokens = Counter(
            p + "gamma_predicted_tokens",
            "Committed tokens the γ controller predicted (compare: accepted + rounds with predictions).",
            registry=r,
        )
        self.gamma_predicted_rounds = Counter(
            p + "gamma_predicted_rounds", "Speculative rounds the γ controller predicted.", registry=r
        )
        self.gamma_committed_tokens = Counter(
            p + "gamma_committed_tokens",
            "Committed tokens of the rounds the γ controller predicted.",
            registry=r,
        )
        self.link_bytes = Counter(p + "link_bytes", "Payload bytes on the link.", ["direction"], registry=r)
        self.tokens = Counter(p + "tokens", "Generated tokens by source.", ["source"], registry=r)
        self.fallback_tokens = Counter(
            p + "fallback_tokens", "Unverified tokens drafted while the cloud was unreachable.", registry=r
        )
        self.failovers = Counter(p + "failovers", "Sessions moved to another worker.", registry=r)
        self.resyncs = Counter(p + "resyncs", "Sessions re-opened after a resync.", registry=r)
        self.generations = Counter(p + "generations", "Finished generations by mode.", ["mode"], registry=r)
        self.generation_seconds = Histogram(
            p + "generation_seconds",
            "Wall time of a whole generation.",
            buckets=GENERATION_BUCKETS,
            registry=r,
        )
        self.ttft_seconds = Histogram(
            p + "time_to_first_token_seconds",
            "Time to the first token.",
            buckets=GENERATION_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge(p + "requests_in_flight", "API requests generating now.", registry=r)
        self.queue_depth = Gauge(p + "queue_depth", "API requests waiting for a generation slot.", registry=r)
        self.requests = Counter(
            p + "http_requests",
            "API requests answered, by endpoint and status.",
            ["endpoint", "status"],
            registry=r,
        )
        for mode in self.MODES:
            self.generations.labels(mode=mode)
        for source in self.SOURCES:
            self.tokens.labels(source=source)
        for direction in ("up", "down"):
            self.link_bytes.labels(direction=direction)
        self.build = _build_info(p + "build", r)
        self.broker_connected = _broker_gauge(p + "broker_connected", r)

    def attach(self, agent: Any) -> EdgeMetrics:
        """Observe every round and every finished generation of ``agent`` (an ``EdgeAgent``), and
        its link's broker connection (``link.broker_connected()``, else its client's ``connected``)."""
        agent.round_observers.append(self.observe_round)
        agent.result_observers.append(self.observe_result)
        link = getattr(agent, "link", None)
        if link is not None:
            self.watch_broker(lambda: _link_connected(link))
        return self

    def watch_broker(self, connected: Any) -> None:
        """Read ``spececd_edge_broker_connected`` from ``connected()`` at each scrape."""
        _watch(self.broker_connected, connected)

    def observe_round(self, stats: Any) -> None:
        """Count one ``RoundStats`` (a speculative round, or a cloud-only decode part when γ = 0)."""
        self.rounds.inc()
        self.round_seconds.observe(stats.link_ms / 1e3)
        self.verify_seconds.observe(stats.verify_ms / 1e3)
        self.link_bytes.labels(direction="up").inc(stats.bytes_up)
        self.link_bytes.labels(direction="down").inc(stats.bytes_down)
        if stats.gamma <= 0:
            return
        self.draft_seconds.observe(stats.draft_ms / 1e3)
        self.drafted.inc(stats.gamma)
        self.gamma.observe(stats.gamma)
        if getattr(stats, "pred_ms", 0.0) > 0:  # the γ controller's prediction vs what happened
            self.gamma_predicted_rounds.inc()
            self.gamma_predicted_tokens.inc(stats.pred_tokens)
            self.gamma_committed_tokens.inc(stats.n_acc + 1)
        self.judged.inc(stats.judged)
        self.accepted.inc(stats.n_acc)
        for pos in range(min(stats.judged, MAX_POSITION + 1)):
            self.position_judged.labels(position=str(pos)).inc()
            if pos < stats.n_acc:
                self.position_accepted.labels(position=str(pos)).inc()

    def observe_result(self, result: Any, opts: Any) -> None:
        """Count one finished ``GenerationResult`` generated with ``opts`` (``GenerateOptions``)."""
        mode = opts.mode if opts.mode in self.MODES else "other"
        self.generations.labels(mode=mode).inc()
        self.fallback_tokens.inc(result.fallback_tokens)
        self.failovers.inc(result.failovers)
        self.resyncs.inc(result.resyncs)
        for source in result.sources:
            self.tokens.labels(source=source if source in self.SOURCES else "other").inc()
        self.generation_seconds.observe(result.total_ms / 1e3)
        if result.token_ids:
            self.ttft_seconds.observe(result.ttft_ms / 1e3)

    def request_done(self, endpoint: str, status: int) -> None:
        """Count one answered API request (``endpoint`` is the route, never a user string)."""
        self.requests.labels(endpoint=endpoint, status=str(status)).inc()

    def render(self) -> bytes:
        """The metrics in the Prometheus text format."""
        return generate_latest(self.registry)


def _link_connected(link: Any) -> bool:
    """Whether an edge link is connected to its broker. An in-process link (no broker) counts
    as connected."""
    probe = getattr(link, "broker_connected", None)
    if callable(probe):
        return bool(probe())
    client = getattr(link, "client", None)
    if client is None:
        return True  # an in-process link: no broker to lose
    connected = getattr(client, "connected", None)
    if hasattr(connected, "is_set"):
        return connected.is_set()
    return bool(connected() if callable(connected) else connected)
