"""Container health check of a SpecECD worker: GET its Prometheus endpoint (stdlib only).

The address comes from SPECECD_METRICS_LISTEN (HOST:PORT; a wildcard host is probed on
loopback), default 127.0.0.1:9464. Exit 0 when it answers 200, 1 otherwise.
"""

from __future__ import annotations

import os
import sys
import urllib.request


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
            ok = resp.status == 200
    except OSError as exc:
        print(f"unhealthy: {url}: {exc}", file=sys.stderr)
        return 1
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
