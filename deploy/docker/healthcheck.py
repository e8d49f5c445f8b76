"""Container health check of a SpecECD worker: its Prometheus endpoint answers and says the
worker is connected to the broker (stdlib only, no model libraries: it runs every 30 s).

The address comes from SPECECD_METRICS_LISTEN (HOST:PORT; a wildcard host is probed on
loopback), default 127.0.0.1:9464. Exit 0 when ``/metrics`` answers 200 with
``spececd_worker_broker_connected 1`` and without ``spececd_worker_ready 0``, 1 otherwise
(down, off the broker, or still loading its model: the worker connects and serves metrics first,
with ready 0 until the model is loaded).
"""

from __future__ import annotations

import os
import re
import sys
import urllib.request

_CONNECTED = re.compile(rb"^spececd_worker_broker_connected(?:\{[^}]*\})? 1(?:\.0)?$", re.M)
_NOT_READY = re.compile(rb"^spececd_worker_ready(?:\{[^}]*\})? 0(?:\.0)?$", re.M)


def main() -> int:
    """Probe the worker's metrics endpoint once."""
    listen = os.environ.get("SPECECD_METRICS_LISTEN", "127.0.0.1:9464")
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    if host in ("", "0.0.0.0", "::"):
        host = "127.0.0.1"
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}/metrics"
    try:
        with urllib.request.urlopen(url, timeout=4) as resp:
            ok, body = resp.status == 200, resp.read()
    except OSError as exc:
        print(f"unhealthy: {url}: {exc}", file=sys.stderr)
        return 1
    if not ok:
        return 1
    if not _CONNECTED.search(body):
        print(f"unhealthy: {url} says the worker is not connected to the broker", file=sys.stderr)
        return 1
    if _NOT_READY.search(body):
        print(f"unhealthy: {url} says the worker is not ready (model loading)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
