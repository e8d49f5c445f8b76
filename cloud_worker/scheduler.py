"""Which queued requests share the next target forward (issue 9; docs/ARCHITECTURE.md, "Worker:
batched verification").

Every session has its own FIFO of jobs (opens, drafts, decodes). A forward takes at most ONE job
per session, so a session's requests keep their order and a decode of n tokens is n forwards,
interleaved with everyone else's work. Sessions with work wait in their device's turn order, and
devices in the worker's turn order: a round takes one session from each device in turn, then
goes round again, until the forward is full. Devices and sessions served go to the back; one
that did not fit stays at the front, so it comes first next time. One device's sessions thus
cannot take the whole batch while another device waits: while several devices have work,
each device's rows beyond its first stay within its share of ``max_tokens`` (the budget divided
by the devices with work), so a flood of long drafts cannot make every forward long.

Bounds of a forward: ``max_sessions`` rows and ``max_tokens`` PADDED positions (rows × longest
row: what a padded forward costs). The first row is always taken; an open's prefill is cut to
fit (the rest is its next step): the whole budget when it comes first, else the current row width.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cloud_worker.sessions import Step

MAX_DEVICES = 1024  # devices whose place in the turn order is remembered while they are idle
MAX_QUEUED_PER_SESSION = 8  # an edge has one request out (plus a retry and a close): more is a flood


@dataclass
class Job:
    """One request of one session, and, once validated, the step it runs as."""

    key: str
    device: str
    sid: str
    msg: Any  # Open | Draft | Decode
    down: str
    incoming: Any  # the MQTT message (correlation data), or None
    received_at: float  # time.perf_counter() when it arrived
    step: Step | None = None
    prefill: bool = False


class Scheduler:
    """Per-session queues served round-robin by device (one job per session per forward)."""

    def __init__(self, *, max_tokens: int = 512, max_sessions: int = 32) -> None:
        if max_tokens < 1 or max_sessions < 1:
            raise ValueError("max_tokens and max_sessions must be >= 1")
        self.max_tokens = max_tokens
        self.max_sessions = max_sessions
        self.queues: dict[str, deque[Job]] = {}
        self.devices: OrderedDict[str, deque[str]] = OrderedDict()  # device -> its sessions with work
        self._queued = 0

    def __len__(self) -> int:
        return self._queued  # a plain int: safe to read from another thread (metrics)

    def push(self, job: Job, *, front: bool = False) -> bool:
        """Queue ``job`` behind its session's others (``front``: a continuing step, before them).
        False (not queued) when the session already has ``MAX_QUEUED_PER_SESSION`` jobs waiting."""
        q = self.queues.get(job.key)
        if q is not None and len(q) >= MAX_QUEUED_PER_SESSION and not front:
            return False
        if q is None:
            q = self.queues[job.key] = deque()
            if job.device not in self.devices and len(self.devices) >= MAX_DEVICES:
                for idle in [d for d, turn in self.devices.items() if not turn]:
                    del self.devices[idle]
            self.devices.setdefault(job.device, deque()).append(job.key)
        if front:
            q.appendleft(job)
        else:
            q.append(job)
        self._queued += 1
        return True

    def drop(self, key: str) -> list[Job]:
        """Remove and return every queued job of session ``key``."""
        q = self.queues.pop(key, None)
        if q is None:
            return []
        self._queued -= len(q)
        turn = self.devices.get(q[0].device)
        if turn is not None and key in turn:
            turn.remove(key)  # the device keeps its place in the turn order
        return list(q)

    def _pop(self, key: str) -> Job:
        q = self.queues[key]
        job = q.popleft()
        self._queued -= 1
        if not q:
            del self.queues[key]
            self.devices[job.device].remove(key)  # the device keeps its place in the turn order
        return job

    def select(self, prepare: Callable[[Job], Step | None]) -> list[tuple[Job, Step]]:
        """Take the jobs of the next forward. ``prepare(job)`` validates a job and returns its
        step, or answers it and returns None (then the session's next job is considered)."""
        batch: list[tuple[Job, Step]] = []
        width = 0  # the longest row so far
        taken: set[str] = set()
        served: list[str] = []
        # a device's fair share of the forward's positions while others have work too; its first
        # row always goes in, more only within the share (the rest waits for the next forward)
        fair = self.max_tokens // max(1, sum(1 for turn in self.devices.values() if turn))
        used: dict[str, int] = {}
        progress = True
        while progress and len(batch) < self.max_sessions:
            progress = False
            for device in list(self.devices):
                if len(batch) >= self.max_sessions:
                    break
                turn = self.devices.get(device)
                key = next((k for k in turn if k not in taken), None) if turn else None
                if key is None:
                    continue
                step = None
                while step is None and key in self.queues:
                    job = self.queues[key][0]
                    step = prepare(job)
                    if step is None:
                        self._pop(key)  # answered without a forward (error or replay)
                if step is None:
                    progress = True
                    continue
                k = self._fit(job, step, len(batch), width)
                if k is not None and used.get(device, 0) and used[device] + k > fair:
                    k = None
                taken.add(key)
                if k is None:
                    continue  # does not fit: first in line next time
                self._pop(key)
                batch.append((job, step))
                width = max(width, k)
                used[device] = used.get(device, 0) + k
                served.append(key)
                progress = True
        firsts = [key.rpartition("/")[0] for key in served]
        for key, device in zip(served, firsts, strict=True):  # served ones go to the back
            if device in self.devices:
                self.devices.move_to_end(device)
                turn = self.devices[device]
                if key in turn:
                    turn.remove(key)
                    turn.append(key)
        if firsts and next(iter(self.devices), None) == firsts[0]:
            self.devices.move_to_end(firsts[0])  # every device was served: the next round starts one later
        return batch

    def _fit(self, job: Job, step: Step, rows: int, width: int) -> int | None:
        """The row length ``step`` runs with in this forward, or None when it does not fit."""
        k = len(step.row.tokens)
        # a prefill is cut into chunks (the rest is its next step): first in a forward it may take
        # the whole budget; beside others only the current row width, so it never pads them
        room = self.max_tokens if rows == 0 else max(width, 1)
        if job.prefill and k > room:
            del step.row.tokens[room:]
            k = room
        if rows and (rows + 1) * max(width, k) > self.max_tokens:
            return None
        return k
