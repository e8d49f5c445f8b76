"""A TCP proxy that delays every byte by rtt/2 in each direction (network delay without netem).

The benchmark puts it between the edge and the broker: the edge connects to the proxy, the
proxy connects to the broker, and each chunk read on one side is written on the other side
``rtt_ms / 2`` later, keeping order and never throttling (like ``netem delay``). Both sockets
set TCP_NODELAY so the proxy adds no Nagle delay of its own.

Run it as a process of its own (``python -m bench.delay_proxy --listen 127.0.0.1:0 --upstream
127.0.0.1:1883 --rtt-ms 20``): it prints ``listening HOST:PORT`` once ready. In a separate process
its event loop never competes with the edge's model work for the GIL.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import socket
import sys
import time
from collections.abc import Sequence

_CHUNK = 1 << 16


def _nodelay(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay_s: float) -> None:
    """Copy ``reader`` to ``writer``, each chunk ``delay_s`` after it arrived, in order."""
    pending: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def send() -> None:
        while True:
            due, data = await pending.get()
            if not data:
                break
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            writer.write(data)
            await writer.drain()
        with contextlib.suppress(OSError):
            writer.write_eof()

    sender = asyncio.create_task(send())
    try:
        while True:
            data = await reader.read(_CHUNK)
            await pending.put((time.monotonic() + delay_s, data))
            if not data:
                break
        await sender
    except (ConnectionError, OSError):
        sender.cancel()
    finally:
        writer.close()


class DelayProxy:
    """Listens on ``listen`` and forwards each connection to ``upstream`` with ``rtt_ms`` added."""

    def __init__(
        self, *, upstream: tuple[str, int], rtt_ms: float, listen: tuple[str, int] = ("127.0.0.1", 0)
    ):
        if rtt_ms < 0:
            raise ValueError(f"rtt_ms must be >= 0, got {rtt_ms}")
        self.upstream = upstream
        self.delay_s = rtt_ms / 2e3
        self.listen = listen
        self.server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        """The port it listens on (after :meth:`start`)."""
        assert self.server is not None, "start() the proxy first"
        return self.server.sockets[0].getsockname()[1]

    async def start(self) -> None:
        """Bind the listening socket."""
        self.server = await asyncio.start_server(self._handle, *self.listen)

    async def _handle(self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        try:
            u_reader, u_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            c_writer.close()
            return
        _nodelay(c_writer)
        _nodelay(u_writer)
        await asyncio.gather(
            _pipe(c_reader, u_writer, self.delay_s),
            _pipe(u_reader, c_writer, self.delay_s),
            return_exceptions=True,
        )


def _hostport(text: str) -> tuple[str, int]:
    """HOST:PORT through the project's one parser (shared.config_keys.parse_hostport)."""
    from shared.config_keys import BadValue, parse_hostport

    try:
        host, port = parse_hostport(text, listen=True)
    except BadValue as bad:
        raise argparse.ArgumentTypeError(f"{text!r}: write {bad}") from None
    return host, port


async def _serve(args: argparse.Namespace) -> None:
    proxy = DelayProxy(upstream=args.upstream, rtt_ms=args.rtt_ms, listen=args.listen)
    await proxy.start()
    print(f"listening {args.listen[0]}:{proxy.port}", flush=True)
    assert proxy.server is not None
    await proxy.server.serve_forever()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the proxy until killed."""
    ap = argparse.ArgumentParser(prog="python -m bench.delay_proxy", description=__doc__.splitlines()[0])
    ap.add_argument("--listen", type=_hostport, default=("127.0.0.1", 0), help="HOST:PORT (port 0: any free)")
    ap.add_argument("--upstream", type=_hostport, required=True, help="the broker, HOST:PORT")
    ap.add_argument("--rtt-ms", type=float, required=True, help="round-trip delay to add (half each way)")
    args = ap.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
