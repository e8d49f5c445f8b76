"""systemd integration of the edge agent: readiness, status and a watchdog fed by the main loop.

Under a ``Type=notify`` unit systemd sets ``NOTIFY_SOCKET``; with ``WatchdogSec=`` it also sets
``WATCHDOG_USEC`` (and ``WATCHDOG_PID``). Messages go through libsystemd's own ``sd_notify``
(via the ``cysystemd`` wheel, which bundles it), so abstract and vsock sockets and credential
passing behave exactly as systemd expects. Without ``NOTIFY_SOCKET`` every call is a no-op,
so the agent runs the same outside systemd.

The watchdog: a thread sends ``WATCHDOG=1`` every WatchdogSec/2, but only while the main loop's
last ``heartbeat()`` is younger than WatchdogSec/2. A hung main loop therefore stops the pings
and systemd restarts the service, whereas a plain timer thread would keep a dead agent alive.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
U = TypeVar("U")


def _sd_notify_sender() -> Callable[[str], None]:
    """libsystemd's sd_notify, through cysystemd (imported only when systemd asks for it)."""
    try:
        from cysystemd.daemon import Notification, notify
    except ImportError as exc:
        raise RuntimeError(
            "NOTIFY_SOCKET is set (the agent runs under a systemd Type=notify unit) but the "
            "'cysystemd' package is missing: install it (pip install cysystemd) or use Type=simple"
        ) from exc

    def send(line: str) -> None:
        key, _, value = line.partition("=")
        kind = Notification[key]
        if kind.value.constant is not None:
            notify(kind, return_exceptions=False)
        else:
            notify(kind, value, return_exceptions=False)

    return send


class ServiceNotifier:
    """Tells systemd how the edge agent is doing. Every method is a no-op outside systemd.

    ``watchdog=False`` (config key ``watchdog``) turns the pings off even when systemd asks for
    them. The main loop must call ``heartbeat()`` at least every ``heartbeat_interval`` seconds.
    """

    def __init__(
        self,
        *,
        watchdog: bool = True,
        env: Mapping[str, str] | None = None,
        sender: Callable[[str], None] | None = None,
    ) -> None:
        env = os.environ if env is None else env
        self.enabled = bool(env.get("NOTIFY_SOCKET"))
        self._send = sender if sender is not None else (_sd_notify_sender() if self.enabled else None)
        self.watchdog_sec = _watchdog_seconds(env) if watchdog and self.enabled else None
        self._last_beat = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.pings_sent = 0

    @property
    def ping_interval(self) -> float | None:
        """Seconds between WATCHDOG=1 pings (WatchdogSec/2), or None when there is no watchdog."""
        return None if self.watchdog_sec is None else self.watchdog_sec / 2

    @property
    def heartbeat_interval(self) -> float:
        """How often the main loop should call ``heartbeat()`` (WatchdogSec/4; 1 s without one)."""
        return 1.0 if self.watchdog_sec is None else self.watchdog_sec / 4

    def notify(self, line: str) -> None:
        """Send one raw notification line (``KEY=value``); failures are logged, never raised."""
        if self._send is None:
            return
        try:
            self._send(line)
        except Exception as exc:  # a broken notify socket must not take the agent down
            log.warning("systemd notification %r failed: %s", line.split("=", 1)[0], exc)

    def status(self, text: str) -> None:
        """Set the one-line status that ``systemctl status`` shows."""
        self.notify("STATUS=" + text.replace("\n", " "))

    def ready(self, status: str | None = None) -> None:
        """Tell systemd start-up is complete (READY=1) and start the watchdog thread."""
        self.heartbeat()
        self.notify("READY=1")
        if status:
            self.status(status)
        self.start_watchdog()

    def stopping(self, status: str | None = None) -> None:
        """Tell systemd the agent is shutting down (STOPPING=1) and stop the watchdog pings."""
        self._stop_thread()
        self.notify("STOPPING=1")
        if status:
            self.status(status)

    def heartbeat(self) -> None:
        """Called by the main loop: it is alive. The watchdog pings only while this is fresh."""
        self._last_beat = time.monotonic()

    def start_watchdog(self) -> None:
        """Start the ping thread if systemd asked for a watchdog (``ready()`` calls this)."""
        if self.watchdog_sec is None or (self._thread is not None and self._thread.is_alive()):
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._watchdog_loop, name="sd-watchdog", daemon=True)
        self._thread.start()

    def _watchdog_loop(self) -> None:
        interval = self.ping_interval
        assert interval is not None
        while not self._stop.wait(interval):
            age = time.monotonic() - self._last_beat
            if age <= interval:
                self.notify("WATCHDOG=1")
                self.pings_sent += 1
            else:
                log.warning("main loop silent for %.1f s: withholding the systemd watchdog ping", age)

    def _stop_thread(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        self._thread = None

    def close(self) -> None:
        """Stop the watchdog thread (without STOPPING=1)."""
        self._stop_thread()

    def __enter__(self) -> ServiceNotifier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _watchdog_seconds(env: Mapping[str, str]) -> float | None:
    """WatchdogSec from WATCHDOG_USEC, if it is meant for this process (as sd_watchdog_enabled)."""
    usec = env.get("WATCHDOG_USEC")
    if not usec:
        return None
    pid = env.get("WATCHDOG_PID")
    if pid and pid.strip() != str(os.getpid()):
        return None
    try:
        value = int(usec)
    except ValueError:
        log.warning("ignoring malformed WATCHDOG_USEC=%r", usec)
        return None
    return value / 1e6 if value > 0 else None


def start_edge_service(
    load_draft: Callable[[], T],
    connect_broker: Callable[[], U] | None,
    notifier: ServiceNotifier,
    *,
    what: str = "draft model",
) -> tuple[T, U | None]:
    """Start-up sequence of the edge agent under systemd.

    Sends STATUS while loading, runs ``load_draft()`` then ``connect_broker()`` (None in
    edge-only mode), and only then READY=1. Returns both results. If either step raises, the
    status says so and the error propagates (systemd then sees the process fail and restarts it).
    """
    step = f"loading {what}"
    try:
        notifier.status(f"{step}...")
        draft = load_draft()
        broker: Any = None
        if connect_broker is not None:
            step = "connecting to the MQTT broker"
            notifier.status(f"{step}...")
            broker = connect_broker()
    except BaseException as exc:
        notifier.status(f"failed while {step}: {type(exc).__name__}: {exc}")
        raise
    notifier.ready(status="ready" if connect_broker is not None else "ready (edge-only)")
    return draft, broker


def serving_state(link: Any, opts: Any) -> tuple[bool, str]:
    """Whether the agent can serve a request now under its mode and cloud-unreachable policy,
    and why (the edge's /health answers 503 when it cannot).

    ``link`` is the agent's ``VerifierLink`` (None in edge-only mode), ``opts`` its default
    ``GenerateOptions``. With the cloud unreachable only speculative mode under policy ``draft``
    can serve (the draft model alone, each token flagged); ``wait`` would block and ``fail``
    would refuse, and cloud-only mode has no draft model to fall back on."""
    if opts.mode == "edge-only":
        return True, "edge-only: the draft model alone"
    if link is None:
        return False, f"mode {opts.mode} needs a link to the cloud and this agent has none"
    if link.available():
        return True, "cloud up"
    if opts.mode == "speculative" and opts.on_cloud_unreachable == "draft":
        return True, "cloud down: serving unverified draft-model tokens (policy draft)"
    return (
        False,
        f"cloud down (broker or workers) and mode {opts.mode} with policy {opts.on_cloud_unreachable}",
    )
