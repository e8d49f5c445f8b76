"""The one thin MQTT module: the only place that imports paho-mqtt (2.x, MQTT 5).

It moves bytes; serialization is the caller's job. API::

    config = BrokerConfig.parse_hostport("broker:8883", username="devA",
                                         password=read_password_file(path),
                                         tls=TLSConfig(ca_file="ca.crt"))
    client = make_client(config, client_id="devA", will=Will(topic, b"offline", retain=True))
    client.connect(timeout=10)                      # blocks until CONNACK
    client.subscribe(filter, qos=1, handler=None)   # blocks until SUBACK; remembered
    client.publish(topic, payload, response_topic=..., correlation_data=..., message_expiry=...)
    msg = client.messages.get(timeout=1)            # Incoming, unless a handler took it
    client.on_reconnect.append(fn)                  # fn() after reconnect + resubscribe
    client.close()                                  # clean DISCONNECT (no Will), stops the thread

Threads: paho's own network thread (``loop_start``) does every socket read and write and
reconnects; the wait before each attempt comes from ``Backoff`` (exponential, jitter, capped,
reset only by a connection that stayed up ``_STABLE_S``), handed to paho with
``reconnect_delay_set``. A lost connection is logged once (WARNING), the reconnect once (INFO),
the attempts in between at DEBUG. Incoming messages are enqueued there (``client.messages``) or
handed to the subscription's ``handler``, which runs on the network thread and must only
enqueue. After a reconnect a separate thread re-makes every subscription (waiting for the
SUBACKs), then sets ``connected`` and calls the ``on_reconnect`` hooks, so a hook may publish and
wait. ``on_disconnect`` hooks run on the network thread right after ``connected`` is cleared.
``connect_in_background()`` starts without a broker: paho's thread keeps trying.

Errors: ``BrokerAuthError`` when the broker refuses the credentials or client id, ``BrokerError``
for everything else (unreachable, TLS, not connected, failed SUBACK/PUBACK); paho and socket
exceptions are wrapped with ``from exc``. TCP_NODELAY is set on every socket (DESIGN §2: 44 ms vs
1 ms per QoS 1 round trip).
"""

from __future__ import annotations

import contextlib
import logging
import queue
import random
import socket
import ssl
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from shared.broker import (  # re-exported: the public names of this module's API
    BrokerConfig,
    Handler,
    Incoming,
    TLSConfig,
    Will,
    broker_config_from_settings,
    read_password_file,
)
from shared.errors import BrokerAuthError, BrokerError

__all__ = [
    "CBOR",
    "Backoff",
    "BrokerConfig",
    "Handler",
    "Incoming",
    "MqttClient",
    "TLSConfig",
    "Will",
    "broker_config_from_settings",
    "make_client",
    "prefer_network_latency",
    "read_password_file",
]

log = logging.getLogger(__name__)

CBOR = "application/cbor"
# CONNACK reason codes that mean "who you are is refused", not "the broker is unwell".
_AUTH_CODES = {0x85, 0x86, 0x87, 0x8A, 0x8C}  # bad client id, bad user/pw, not authorized, banned, bad auth
_SESSION_TAKEN_OVER = 0x8E
_STABLE_S = 5.0  # a connection up this long resets the reconnect backoff


class _Acks:
    """Acknowledgements (SUBACK, UNSUBACK, PUBACK) by message id, for callers that wait.

    The ack can arrive before the caller learns its mid, so unclaimed acks are kept in a small
    ring; waiting never holds a lock across a paho call (paho calls back under its own locks).
    """

    def __init__(self, keep: int = 1024) -> None:
        self._cond = threading.Condition()
        self._recent: OrderedDict[tuple[str, int], object] = OrderedDict()
        self._keep = keep

    def put(self, kind: str, mid: int, result: object) -> None:
        with self._cond:
            self._recent[(kind, mid)] = result
            while len(self._recent) > self._keep:
                self._recent.popitem(last=False)
            self._cond.notify_all()

    def wait(self, kind: str, mid: int, timeout: float) -> object:
        with self._cond:
            if not self._cond.wait_for(lambda: (kind, mid) in self._recent, timeout):
                raise TimeoutError
            return self._recent.pop((kind, mid))


class Backoff:
    """Reconnect delays: exponential from ``min_delay``, capped at ``max_delay``, with jitter.

    Each delay is drawn from [d/2, d] ("equal jitter"), d doubling per failed attempt, so many
    clients that lost one broker do not come back in lockstep. ``reset()`` after a connection
    that stayed up long enough."""

    def __init__(self, min_delay: float, max_delay: float, *, rng: random.Random | None = None) -> None:
        self.min_delay, self.max_delay = min_delay, max_delay
        self.attempts = 0
        self._rng = rng or random.Random()

    def next(self) -> float:
        """The delay before the next attempt (and count the attempt)."""
        d = min(self.min_delay * 2.0 ** min(self.attempts, 30), self.max_delay)
        self.attempts += 1
        return self._rng.uniform(d / 2, d)

    def reset(self) -> None:
        self.attempts = 0


class MqttClient:
    """An MQTT 5 client that reconnects by itself. Make it with ``make_client``.

    paho is used through its public API only: paho's own network thread (``loop_start``) does
    every socket read and write (so publishes from many threads never write to one TLS stream
    at once: ``publish`` only queues the packet and wakes that thread), and paho's own reconnect
    loop reconnects, with the delay of each wait set from our ``Backoff`` through
    ``reconnect_delay_set`` in the disconnect / connect-failure callbacks."""

    def __init__(
        self,
        config: BrokerConfig,
        *,
        client_id: str,
        will: Will | None = None,
        clean_start: bool = True,
        reconnect_min_delay: float = 0.25,
        reconnect_max_delay: float = 10.0,
    ) -> None:
        self.config = config
        self.client_id = client_id
        self.messages: queue.Queue[Incoming] = queue.Queue()
        self.connected = threading.Event()
        self.on_reconnect: list[Callable[[], None]] = []
        self.on_disconnect: list[Callable[[], None]] = []  # network thread, on a lost connection
        self.backoff = Backoff(reconnect_min_delay, reconnect_max_delay)
        self._clean_start = clean_start
        self._subs: dict[str, tuple[int, Handler | None]] = {}  # filter -> (qos, handler)
        self._routes: list[tuple[str, Handler]] = []  # (match filter, handler), subscription order
        self._lock = threading.Lock()
        self._acks = _Acks()
        self._connack: ReasonCode | None = None
        self._connack_event = threading.Event()
        self._ever_connected = False
        self._started = False  # paho's network thread runs
        self._background = False  # started by connect_in_background: the first connection is retried
        self._closing = False
        self._up_since: float | None = None  # monotonic time of the last successful CONNACK
        self._down_since: float | None = None  # monotonic time the connection was lost (logged)
        self._quick_drops = 0  # established connections lost within _STABLE_S, in a row
        self._refused_logged = False  # a refused reconnect was logged (once per outage)
        self._disconnected = threading.Event()
        self._paho = self._make_paho(will)

    def _make_paho(self, will: Will | None) -> paho.Client:
        c = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=paho.MQTTv5,
        )
        cfg = self.config
        if cfg.username is not None:
            c.username_pw_set(cfg.username, cfg.password)
        if cfg.tls is not None:
            try:
                c.tls_set(ca_certs=cfg.tls.ca_file, certfile=cfg.tls.cert_file, keyfile=cfg.tls.key_file)
            except (OSError, ssl.SSLError) as exc:
                raise BrokerError(
                    f"cannot load TLS files (ca {cfg.tls.ca_file!r}, cert {cfg.tls.cert_file!r}): {exc}"
                ) from exc
            c.tls_insecure_set(cfg.tls.insecure)
        if will is not None:
            c.will_set(will.topic, will.payload, qos=will.qos, retain=will.retain)
        c.reconnect_delay_set(self.backoff.min_delay, self.backoff.min_delay)
        c.on_socket_open = _set_nodelay
        c.on_connect = self._on_connect
        c.on_connect_fail = self._on_connect_fail
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        c.on_subscribe = lambda _c, _u, mid, codes, _p: self._acks.put("sub", mid, codes)
        c.on_unsubscribe = lambda _c, _u, mid, codes, _p: self._acks.put("unsub", mid, codes)
        c.on_publish = lambda _c, _u, mid, code, _p: self._acks.put("pub", mid, code)
        return c

    # -- connecting -------------------------------------------------------------------------

    def connect(self, timeout: float = 10.0) -> None:
        """Connect and block until the broker's CONNACK; then keep the connection up in a thread."""
        cfg = self.config
        self._paho.connect_timeout = timeout
        try:
            self._paho.connect(cfg.host, cfg.port, keepalive=cfg.keepalive, clean_start=self._clean_start)
        except ssl.SSLError as exc:
            raise BrokerError(
                f"TLS handshake with the broker at {cfg.address} failed: {exc}. Check that the CA file "
                "is the one that signed the broker's certificate and that the host name matches it."
            ) from exc
        except (OSError, ValueError) as exc:
            raise BrokerError(
                f"cannot reach the MQTT broker at {cfg.address}: {exc}. Is mosquitto running, and are "
                "the host and port right (1883 plain, 8883 TLS)?"
            ) from exc
        self._start_loop()
        if not self._connack_event.wait(timeout):
            self._shutdown()
            raise BrokerError(f"no CONNACK from the broker at {cfg.address} within {timeout:.1f} s")
        code = self._connack
        if code is None:
            self._shutdown()
            raise BrokerError(
                f"the broker at {cfg.address} closed the connection before its CONNACK. Is it an MQTT "
                "listener of this kind (TLS vs plain), and does it accept MQTT 5?"
            )
        if code.is_failure:
            self._shutdown()
            raise _refusal(cfg, code)
        # The CONNACK is signalled before the network thread marks the client connected (and,
        # with subscriptions already made, before it resubscribes): return once it is usable, or
        # a publish right after connect() can find it "not connected" on a busy machine.
        if not self.connected.wait(timeout):
            self._shutdown()
            raise BrokerError(
                f"connected to the broker at {cfg.address} but not ready within {timeout:.1f} s"
            )

    def connect_in_background(self) -> None:
        """Start connecting without waiting (the broker may be down): paho's thread retries with
        the backoff; subscriptions made meanwhile (``subscribe(..., when_connected=True)``) are
        made on connect, then ``connected`` is set. A refused login is logged and not retried."""
        cfg = self.config
        self._background = True
        self._closing = False  # a failed connect() shut the loop down; this starts it again
        self._connack_event.clear()
        self._paho.connect_async(cfg.host, cfg.port, keepalive=cfg.keepalive, clean_start=self._clean_start)
        self._start_loop()

    def _start_loop(self) -> None:
        self._started = True
        self._paho.loop_start()

    def _on_connect(self, _c: object, _u: object, _flags: object, code: ReasonCode, _p: object) -> None:
        self._connack = code
        self._connack_event.set()
        if code.is_failure:
            err = _refusal(self.config, code)
            if self._ever_connected and not self._refused_logged:  # once, not at every attempt
                self._refused_logged = True
                log.error("broker at %s refused the reconnect: %s", self.config.address, err)
            elif self._background:
                log.error("%s", err)
                if isinstance(err, BrokerAuthError):  # retrying cannot fix who we are
                    threading.Thread(target=self._shutdown, daemon=True).start()
            return
        self._up_since = time.monotonic()
        self._refused_logged = False
        first = not self._ever_connected
        self._ever_connected = True
        if self._down_since is not None:
            log.info(
                "reconnected to %s after %.1f s (%d attempts)",
                self.config.address,
                self._up_since - self._down_since,
                self.backoff.attempts,
            )
            self._down_since = None
        elif self._background:
            log.info("connected to the broker at %s", self.config.address)
        with self._lock:
            has_subs = bool(self._subs)
        if first and not has_subs:
            self.connected.set()
            return
        # Resubscribing waits for SUBACKs, which this (network) thread delivers: do it elsewhere.
        threading.Thread(target=self._resume, name=f"mqtt-resume-{self.client_id}", daemon=True).start()

    def _resume(self) -> None:
        """Make every subscription, set ``connected``, run the ``on_reconnect`` hooks (also after
        a first connection made in the background)."""
        done: set[str] = set()
        try:
            while True:  # a subscription recorded meanwhile is made too
                with self._lock:  # set under the lock: a subscribe() that saw "not connected" is in todo
                    todo = [(f, q) for f, (q, _h) in self._subs.items() if f not in done]
                    if not todo:
                        self.connected.set()
                        break
                for topic_filter, qos in todo:
                    self._subscribe_wait(topic_filter, qos, timeout=10.0)
                    done.add(topic_filter)
        except BrokerError as exc:
            log.warning("subscribing after a (re)connect failed (%s); will retry on the next one", exc)
            return
        log.debug("connected to %s, %d subscription(s) made", self.config.address, len(done))
        for hook in list(self.on_reconnect):
            try:
                hook()
            except Exception:
                log.exception("on_reconnect hook %r failed", hook)

    def _on_connect_fail(self, _c: object, _u: object) -> None:
        """paho could not open the connection (reconnecting, or a first connect in background)."""
        delay = self.backoff.next()
        self._paho.reconnect_delay_set(delay, delay)  # paho's next wait
        log.debug("connecting to %s failed; next attempt in %.2f s", self.config.address, delay)
        if (
            self.backoff.attempts > 1
            and self.backoff.max_delay
            <= self.backoff.min_delay * 2.0 ** (self.backoff.attempts - 1)
            < 2 * self.backoff.max_delay
        ):
            log.info(
                "the broker at %s is still unreachable; retrying about every %.0f s",
                self.config.address,
                self.backoff.max_delay,
            )

    def _on_disconnect(self, _c: object, _u: object, _flags: object, code: ReasonCode, _p: object) -> None:
        was_connected = self.connected.is_set()
        self.connected.clear()
        self._disconnected.set()
        if not self._ever_connected and not self._background:
            self._connack_event.set()  # closed before any CONNACK: connect() reports it
        if self._up_since is not None:  # a session that had been established is gone
            up_for, self._up_since = time.monotonic() - self._up_since, None
            self._quick_drops = 0 if up_for >= _STABLE_S else self._quick_drops + 1
            if up_for >= _STABLE_S:
                self.backoff.reset()  # only a connection that stayed up resets the backoff
            if code.value == _SESSION_TAKEN_OVER or self._quick_drops == 3:
                log.error(
                    "the connection to %s as %r keeps being dropped right after it is made: another "
                    "client probably uses the same username (the broker gives the session to the "
                    "newest connection). Give every device and worker its own username.",
                    self.config.address,
                    self.config.username or self.client_id,
                )
        if self._closing:
            return
        delay = self.backoff.next()
        self._paho.reconnect_delay_set(delay, delay)
        if was_connected and self._down_since is None:
            self._down_since = time.monotonic()
            log.warning("lost the broker at %s (%s); reconnecting", self.config.address, code)
        for hook in list(self.on_disconnect):
            try:
                hook()
            except Exception:
                log.exception("on_disconnect hook %r failed", hook)

    # -- subscriptions ----------------------------------------------------------------------

    def subscribe(
        self,
        topic_filter: str,
        qos: int = 1,
        *,
        handler: Handler | None = None,
        timeout: float = 5.0,
        when_connected: bool = False,
    ) -> None:
        """Subscribe and wait for the SUBACK; re-made after every reconnect.

        Messages matching ``topic_filter`` go to ``handler`` (called on the network thread: it must
        only enqueue) or, without one, to ``self.messages``. With ``when_connected``, a client not
        connected now only records the subscription; it is made when the connection comes up.
        """
        with self._lock:
            self._subs[topic_filter] = (qos, handler)
            self._routes = [(_match_filter(f), h) for f, (_q, h) in self._subs.items() if h is not None]
            if when_connected and not self.connected.is_set():
                return
        self._subscribe_wait(topic_filter, qos, timeout)

    def _subscribe_wait(self, topic_filter: str, qos: int, timeout: float) -> None:
        rc, mid = self._paho.subscribe(topic_filter, qos=qos)
        self._check_rc(rc, f"subscribe to {topic_filter!r}")
        codes = self._wait_ack("sub", mid, timeout, f"SUBACK for {topic_filter!r}")
        for code in codes:  # type: ignore[attr-defined]
            if code.is_failure:
                raise BrokerError(
                    f"the broker at {self.config.address} refused the subscription {topic_filter!r}: {code}"
                )

    def unsubscribe(self, topic_filter: str, timeout: float = 5.0) -> None:
        """Forget a subscription and wait for the UNSUBACK."""
        with self._lock:
            self._subs.pop(topic_filter, None)
            self._routes = [(_match_filter(f), h) for f, (_q, h) in self._subs.items() if h is not None]
        rc, mid = self._paho.unsubscribe(topic_filter)
        self._check_rc(rc, f"unsubscribe from {topic_filter!r}")
        self._wait_ack("unsub", mid, timeout, f"UNSUBACK for {topic_filter!r}")

    # -- publishing -------------------------------------------------------------------------

    def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        response_topic: str | None = None,
        correlation_data: bytes | None = None,
        message_expiry: int | None = None,
        content_type: str | None = CBOR,
        wait: bool = False,
        timeout: float = 5.0,
    ) -> None:
        """Publish ``payload``; with ``wait`` block until the PUBACK (QoS 1) and check its reason code.

        Raises ``BrokerError`` at once when not connected (the caller decides whether to retry)."""
        if not self.connected.is_set():
            raise BrokerError(
                f"not connected to the broker at {self.config.address}; publish to {topic!r} dropped"
            )
        props = Properties(PacketTypes.PUBLISH)
        if content_type is not None:
            props.ContentType = content_type
        if response_topic is not None:
            props.ResponseTopic = response_topic
        if correlation_data is not None:
            props.CorrelationData = correlation_data
        if message_expiry is not None:
            props.MessageExpiryInterval = message_expiry
        try:
            info = self._paho.publish(topic, payload, qos=qos, retain=retain, properties=props)
        except ValueError as exc:
            raise BrokerError(f"cannot publish to {topic!r}: {exc}") from exc
        self._check_rc(info.rc, f"publish to {topic!r}")
        if wait:
            code = self._wait_ack("pub", info.mid, timeout, f"PUBACK for {topic!r}")
            if code.is_failure:  # type: ignore[attr-defined]
                err = BrokerAuthError if code.value in _AUTH_CODES else BrokerError  # type: ignore[attr-defined]
                raise err(f"the broker at {self.config.address} refused the publish to {topic!r}: {code}")

    # -- shutting down ----------------------------------------------------------------------

    def close(self, timeout: float = 2.0) -> None:
        """Disconnect cleanly (the broker does not send the Will) and stop the network thread."""
        self._closing = True
        if self.connected.is_set():
            self._disconnected.clear()
            self._paho.disconnect()
            self._disconnected.wait(timeout)  # the network thread sends the DISCONNECT
        self._shutdown()

    def _shutdown(self) -> None:
        """Stop paho's network thread (and its reconnect loop); paho closes the socket."""
        self._closing = True
        self.connected.clear()
        self._paho.disconnect()  # also ends a reconnect wait
        if self._started:
            self._started = False
            thread = getattr(self._paho, "_thread", None)
            try:
                self._paho.loop_stop()
            except AttributeError:
                # paho's loop_stop checks its _thread, then joins it, and the network thread sets
                # it to None as it ends (eclipse-paho/paho.mqtt.python#872): it ended in between
                if thread is not None and thread is not threading.current_thread():
                    thread.join()

    def __enter__(self) -> MqttClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals --------------------------------------------------------------------------

    def _on_message(self, _c: object, _u: object, msg: paho.MQTTMessage) -> None:
        props = msg.properties
        incoming = Incoming(
            topic=msg.topic,
            payload=bytes(msg.payload),
            response_topic=getattr(props, "ResponseTopic", None),
            correlation_data=getattr(props, "CorrelationData", None),
            content_type=getattr(props, "ContentType", None),
            message_expiry=getattr(props, "MessageExpiryInterval", None),
            retain=bool(msg.retain),
            received_at=time.perf_counter(),
        )
        for topic_filter, handler in self._routes:
            if paho.topic_matches_sub(topic_filter, incoming.topic):
                try:
                    handler(incoming)
                except Exception:  # a raising handler must not kill the network thread
                    log.exception("message handler for %r failed on %r", topic_filter, incoming.topic)
                return
        self.messages.put(incoming)

    def _check_rc(self, rc: MQTTErrorCode | int, what: str) -> None:
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise BrokerError(f"{what} failed: {paho.error_string(rc)} (broker {self.config.address})")

    def _wait_ack(self, kind: str, mid: int | None, timeout: float, what: str) -> object:
        try:
            return self._acks.wait(kind, int(mid or 0), timeout)
        except TimeoutError:
            raise BrokerError(
                f"no {what} from the broker at {self.config.address} within {timeout:.1f} s"
            ) from None


def make_client(
    config: BrokerConfig,
    *,
    client_id: str,
    will: Will | None = None,
    clean_start: bool = True,
    reconnect_min_delay: float = 0.25,
    reconnect_max_delay: float = 10.0,
) -> MqttClient:
    """Make an ``MqttClient`` (not yet connected: call ``connect``)."""
    return MqttClient(
        config,
        client_id=client_id,
        will=will,
        clean_start=clean_start,
        reconnect_min_delay=reconnect_min_delay,
        reconnect_max_delay=reconnect_max_delay,
    )


def _set_nodelay(_client: object, _userdata: object, sock: socket.socket) -> None:
    # Without it a QoS 1 round trip through the broker waits on Nagle + delayed ACK (44 ms vs 1 ms).
    with contextlib.suppress(OSError, AttributeError):  # not a TCP socket (e.g. a unix socket)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _match_filter(topic_filter: str) -> str:
    """The filter that matches delivered topics: a shared subscription delivers the plain topic."""
    if topic_filter.startswith("$share/"):
        return topic_filter.split("/", 2)[2]
    return topic_filter


def _refusal(cfg: BrokerConfig, code: ReasonCode) -> BrokerError:
    who = f"user {cfg.username!r}" if cfg.username else "an anonymous client"
    if code.value in _AUTH_CODES:
        return BrokerAuthError(
            f"the broker at {cfg.address} refused {who}: {code} (reason code {code.value}). Check the "
            "username and password (--username / --password-file); a new device or worker must be "
            "added to the broker's password file first (broker/add-device.sh, broker/add-worker.sh)."
        )
    return BrokerError(f"the broker at {cfg.address} refused the connection of {who}: {code} ({code.value})")


SWITCH_INTERVAL_S = 0.0005


def prefer_network_latency() -> None:
    """Make the interpreter hand the GIL between threads every 0.5 ms instead of 5 ms.

    A message arriving on paho's network thread waits for the GIL while another thread runs
    Python glue between torch calls (the edge drafting ahead, the worker's model thread). With
    pipelined drafting (the default) this cut the median non-compute time of a round on tiny
    models from 4.25 to 2.75 ms; with sequential drafting it made no clear difference
    (``python -m bench.overhead``, docs/BENCHMARKS.md §2.5). Called by the entry points
    (``spececd-edge``, ``spececd-worker``, ``spececd-bench``, the demo), not on import."""
    import sys

    sys.setswitchinterval(SWITCH_INTERVAL_S)
