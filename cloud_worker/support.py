"""Small parts of the worker: metrics stand-in, ownership record, model-name match, SIGTERM."""

from __future__ import annotations

import logging
import signal
import threading
from dataclasses import dataclass
from typing import Any

from shared import topics
from shared.errors import ProtocolError

log = logging.getLogger("cloud_worker.worker")


class NullMetrics:
    """Stands in for ``shared.metrics.WorkerMetrics`` when metrics are off."""

    def __getattr__(self, _name: str) -> Any:
        return lambda *a, **k: None


@dataclass(frozen=True, slots=True)
class Owned:
    device: str
    sid: str
    down: str


def same_model_name(a: str, b: str) -> bool:
    """Model names match when either is empty or their last path part agrees (case-insensitive).

    The edge names models by hub id, folder or file; ``Qwen/Qwen2.5-1.5B`` and
    ``/models/qwen2.5-1.5b`` name the same model."""
    if not a or not b:
        return True
    last = lambda s: s.rstrip("/").rsplit("/", 1)[-1].removesuffix(".gguf").lower()  # noqa: E731
    return last(a) == last(b)


def safe_parse(topic: str):
    try:
        return topics.parse_topic(topic)
    except ProtocolError:
        return None


def install_sigterm(worker: Any) -> threading.Event:
    """SIGTERM/SIGINT → graceful ``stop``; returns an event set when the worker has stopped."""
    done = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        log.info("signal %d: draining", signum)
        threading.Thread(target=lambda: (worker.stop(), done.set()), daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    return done
