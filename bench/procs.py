"""The processes a networked benchmark run needs: its own Mosquitto, delay proxies, a worker.

Each is started on a free port of 127.0.0.1 and stopped by :class:`Procs` (a context manager)
whatever happens. The worker is pinned to one core and runs one torch thread, as the edge does in
the benchmark's own process (DESIGN §7: edge and cloud must not share a core).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from shared.config_keys import DEFAULT_MAX_SESSIONS

REPO = Path(__file__).resolve().parent.parent
DEV_CONF = REPO / "broker" / "mosquitto-dev.conf"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(
    host: str, port: int, proc: subprocess.Popen, what: str, log: Path, timeout: float
) -> None:
    """Block until ``host:port`` accepts TCP connections; raise with the log if ``proc`` dies."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"{what} exited with {proc.returncode}:\n{log.read_text(errors='replace')[-4000:]}"
            )
        try:
            socket.create_connection((host, port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on {host}:{port} within {timeout:.0f} s; see {log}")


def pin_preexec(cores: set[int] | None):
    """A ``preexec_fn`` pinning the child to ``cores`` (None: no pinning)."""
    if not cores:
        return None

    def _pin() -> None:
        os.sched_setaffinity(0, cores)

    return _pin


def one_thread_env() -> dict[str, str]:
    """The environment with every math library limited to one thread."""
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    return env


class Procs:
    """Owns the child processes of one benchmark run; ``stop_all`` (or leaving ``with``) ends them."""

    def __init__(self, workdir: Path | None = None) -> None:
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="spececd-bench-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.children: list[tuple[str, subprocess.Popen]] = []

    def __enter__(self) -> Procs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()

    def _spawn(
        self, name: str, argv: list[str], *, cores: set[int] | None = None, env=None, cwd: Path | None = None
    ) -> tuple[subprocess.Popen, Path]:
        log = self.workdir / f"{name}.log"
        with log.open("ab") as fh:
            proc = subprocess.Popen(
                argv,
                stdout=fh,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=pin_preexec(cores),
                env=env,
                cwd=cwd or REPO,
            )
        self.children.append((name, proc))
        return proc, log

    def start_broker(self, conf: Path = DEV_CONF, timeout: float = 10.0) -> tuple[str, int]:
        """Our own Mosquitto from ``conf`` (listener moved to a free port); returns (host, port)."""
        port = free_port()
        lines = []
        for line in conf.read_text().splitlines():
            lines.append(f"listener {port} 127.0.0.1" if line.startswith("listener ") else line)
        if os.geteuid() == 0:
            lines.append("user root")  # else mosquitto drops to a user that cannot read our temp dir
        rendered = self.workdir / "mosquitto.conf"
        rendered.write_text("\n".join(lines) + "\n")
        proc, log = self._spawn("mosquitto", ["mosquitto", "-c", str(rendered)])
        wait_listening("127.0.0.1", port, proc, "mosquitto", log, timeout)
        return "127.0.0.1", port

    def start_proxy(self, upstream: tuple[str, int], rtt_ms: float, timeout: float = 10.0) -> tuple[str, int]:
        """A delay proxy in front of ``upstream``; returns its (host, port)."""
        port = free_port()
        argv = [sys.executable, "-m", "bench.delay_proxy", "--listen", f"127.0.0.1:{port}",
                "--upstream", f"{upstream[0]}:{upstream[1]}", "--rtt-ms", str(rtt_ms)]  # fmt: skip
        proc, log = self._spawn(f"proxy-{rtt_ms:g}ms", argv, env=one_thread_env())
        wait_listening("127.0.0.1", port, proc, "delay proxy", log, timeout)
        return "127.0.0.1", port

    def start_worker(
        self,
        broker: tuple[str, int],
        *,
        target: str,
        draft_name: str,
        worker_id: str,
        cores: set[int] | None,
        max_sessions: int = DEFAULT_MAX_SESSIONS,
        extra: Sequence[str] = (),
    ) -> tuple[subprocess.Popen, Path]:
        """``python -m cloud_worker.cli`` (spececd-worker) on ``cores``, one thread, with ``extra``
        flags of its own (e.g. ``--dtype bfloat16``); readiness: see the caller."""
        argv = [sys.executable, "-m", "cloud_worker.cli", "--broker", f"{broker[0]}:{broker[1]}",
                "--target", target, "--draft", draft_name, "--worker-id", worker_id,
                "--max-sessions", str(max_sessions), *extra]  # fmt: skip
        return self._spawn(f"worker-{worker_id}", argv, cores=cores, env=one_thread_env())

    def stop_all(self, timeout: float = 10.0) -> None:
        """SIGTERM every child (newest first), SIGKILL those still alive after ``timeout``."""
        for _name, proc in reversed(self.children):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for _name, proc in reversed(self.children):
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        self.children.clear()

    def log_tail(self, name_prefix: str, chars: int = 3000) -> str:
        """The end of the log of the first child whose name starts with ``name_prefix``."""
        for log in sorted(self.workdir.glob(f"{name_prefix}*.log")):
            return log.read_text(errors="replace")[-chars:]
        return ""
