"""Running the API's ASGI app under uvicorn: in a background thread (tests, embedding) or blocking."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from starlette.applications import Starlette


@dataclass
class ServerHandle:
    """A uvicorn server running in a background thread (``start_server``)."""

    server: object
    thread: threading.Thread
    host: str
    port: int

    @property
    def url(self) -> str:
        """Base URL of the OpenAI API (``.../v1``)."""
        return f"http://{self.host}:{self.port}/v1"

    def stop(self, timeout: float = 10.0) -> None:
        """Ask the server to exit and wait for its thread."""
        self.server.should_exit = True  # type: ignore[attr-defined]
        self.thread.join(timeout)


def uvicorn_server(app: Starlette, host: str, port: int, log_level: str):
    """A ``uvicorn.Server`` for ``app`` that leaves logging to ``shared.logs``."""
    import uvicorn

    config = uvicorn.Config(
        app, host=host, port=port, log_level=log_level.lower(), log_config=None, lifespan="on"
    )
    return uvicorn.Server(config)


def start_server(
    app: Starlette, host: str = "127.0.0.1", port: int = 0, *, log_level: str = "warning"
) -> ServerHandle:
    """Serve ``app`` in a daemon thread; returns once it listens (port 0 picks a free port)."""
    server = uvicorn_server(app, host, port, log_level)
    thread = threading.Thread(target=server.run, name="spececd-api", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the API server did not start on {host}:{port} (is the port in use?)")
        time.sleep(0.01)
    bound = server.servers[0].sockets[0].getsockname()[1] if port == 0 else port
    return ServerHandle(server, thread, host, bound)
