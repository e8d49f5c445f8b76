"""Workers for transport tests: in a thread of the test process, or as a real subprocess
(``python -m cloud_worker.cli``) that a test can SIGKILL or SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from shared import topics
from shared.mqtt import BrokerConfig, make_client

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class WorkerProcess:
    worker_id: str
    proc: subprocess.Popen
    log: Path

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def terminate(self, timeout: float = 30.0) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def start_worker_process(
    broker: BrokerConfig, *, worker_id: str, target: str, workdir: Path, extra: list[str] | None = None
) -> WorkerProcess:
    """Start ``spececd-worker`` and wait until its retained status says ``online``."""
    log = workdir / f"{worker_id}.log"
    cmd = [
        sys.executable, "-m", "cloud_worker.cli", "--broker", f"{broker.host}:{broker.port}",
        "--worker-id", worker_id, "--target", target, "--draft", "tiny-draft", "--max-sessions", "8",
        *(extra or []),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    wp = WorkerProcess(worker_id, proc, log)
    try:
        wait_status(broker, worker_id, topics.ONLINE, timeout=60, proc=proc, log=log)
    except BaseException:
        proc.kill()  # never left running past a failed start
        raise
    return wp


def start_worker_processes(
    broker: BrokerConfig, worker_ids: list[str], *, target: str, workdir: Path, extra: list[str] | None = None
) -> dict[str, WorkerProcess]:
    """Start several workers; if one fails to come up, stop those already started (a worker
    left running would answer the opens of later tests on the same broker) and raise."""
    started: dict[str, WorkerProcess] = {}
    try:
        for wid in worker_ids:
            started[wid] = start_worker_process(
                broker, worker_id=wid, target=target, workdir=workdir, extra=extra
            )
    except BaseException:
        for wp in started.values():
            wp.proc.kill()
        raise
    return started


def wait_status(
    broker: BrokerConfig, worker_id: str, want: bytes, *, timeout: float, proc=None, log: Path | None = None
) -> None:
    client = make_client(broker, client_id=f"probe-{worker_id}-{time.monotonic_ns()}")
    client.connect()
    try:
        client.subscribe(topics.status_topic(worker_id))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"worker exited with {proc.returncode}: {log.read_text() if log else ''}")
            try:
                msg = client.messages.get(timeout=0.2)
            except Exception:
                continue
            if msg.payload == want:
                return
        raise TimeoutError(f"worker {worker_id} never reported {want!r}")
    finally:
        client.close()
