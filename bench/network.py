"""The networked side of a benchmark run: broker, worker subprocess, delay proxies, MQTT links."""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Sequence

from bench.procs import Procs
from shared.mqtt import BrokerConfig


def wait_worker_online(link, worker_id: str, proc, procs: Procs, timeout_s: float) -> float:
    """Block until ``worker_id`` announces itself online through ``link``; returns the seconds waited."""
    t0 = time.monotonic()
    while worker_id not in link.workers_online():
        if proc.poll() is not None:
            raise RuntimeError(
                f"the worker exited with {proc.returncode} before it came online:\n{procs.log_tail('worker')}"
            )
        if time.monotonic() - t0 > timeout_s:
            raise RuntimeError(
                f"the worker was not online after {timeout_s:.0f} s (loading the target model?); "
                f"raise --worker-timeout-s. Its log:\n{procs.log_tail('worker')}"
            )
        time.sleep(0.2)
    return time.monotonic() - t0


def setup_network(
    procs: Procs,
    *,
    broker: tuple[str, int] | None,
    rtts: list[float],
    target_spec: str,
    draft_name: str,
    worker_cores: set[int] | None,
    round_timeout_s: float,
    worker_timeout_s: float,
    worker_args: Sequence[str] = (),
) -> tuple[dict[float, object], dict]:
    """Start what the networked modes need; returns ({rtt: connected MqttLink}, meta).

    ``broker`` None starts our own Mosquitto (``broker/mosquitto-dev.conf``: TCP_NODELAY on) on a
    free port. RTT 0 connects straight to the broker; any other RTT through a delay proxy of its
    own, so only the edge's path is delayed (the worker sits next to the broker).
    """
    from edge_agent.mqtt_link import MqttLink  # the networked modes only

    own = broker is None
    if broker is None:
        broker = procs.start_broker()
    worker_id = f"bench-{uuid.uuid4().hex[:8]}"
    proc, _log = procs.start_worker(
        broker,
        target=target_spec,
        draft_name=draft_name,
        worker_id=worker_id,
        cores=worker_cores,
        extra=worker_args,
    )
    links: dict[float, object] = {}
    for i, rtt in enumerate(rtts):
        addr = broker if rtt == 0 else procs.start_proxy(broker, rtt)
        link = MqttLink(
            BrokerConfig(host=addr[0], port=addr[1]),
            device=f"bench{i}-{worker_id}",
            round_timeout_s=round_timeout_s,
        )
        link.connect()
        links[rtt] = link
    waited = wait_worker_online(next(iter(links.values())), worker_id, proc, procs, worker_timeout_s)
    meta = {
        "broker": f"{broker[0]}:{broker[1]}" + (" (own, broker/mosquitto-dev.conf)" if own else " (given)"),
        "worker_id": worker_id,
        "worker_cores": sorted(worker_cores) if worker_cores else "not pinned",
        "worker_ready_s": round(waited, 1),
        "worker_args": list(worker_args),
    }
    return links, meta


def shutdown_links(links: dict[float, object]) -> None:
    """Disconnect every link (best effort)."""
    for link in links.values():
        with contextlib.suppress(Exception):  # shutting down anyway
            link.shutdown()  # type: ignore[attr-defined]
