"""A worker's session state and the step type of a forward (``cloud_worker.verifier``).

Sessions are keyed by (device, sid), stored as ``"device/sid"``: ``/`` can appear in neither, and
the in-process link has no device, so there the key is the sid.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from cloud_worker.batching import Row
from shared.protocol import Error, Opened, Tokens, Verdict
from shared.sampling import SamplingParams

Reply = Opened | Verdict | Tokens | Error


def session_key(device: str, sid: str) -> str:
    """The key of session ``sid`` of ``device`` (``"device/sid"``; the sid alone in-process)."""
    return f"{device}/{sid}" if device else sid


def key_device(key: str) -> str:
    """The device part of a session key ("" in-process)."""
    return key.rpartition("/")[0]


@dataclass
class Session:
    """One session on this worker: committed tokens, its KV cache and its last answer."""

    sid: str
    epoch: int
    params: SamplingParams
    tokens: list[int]
    limit: int  # the most tokens this session may ever hold: len(ctx) + max_new
    cache: DynamicCache = field(default_factory=DynamicCache)
    cache_len: int = 0
    last_seq: int = -1
    last_replies: list = field(default_factory=list)  # the answer to last_seq, replayed on a repeat


@dataclass
class Step:
    """One session's row of a forward and what to do with its logits ``[k, V]``."""

    key: str
    sess: Session
    row: Row
    finish: Callable[[Step, torch.Tensor, float], list[Reply]]  # (self, logits, forward ms) -> replies
    queue_ms: float = 0.0
    more: bool = False  # set by finish: the request needs another step (decode, chunked prefill)
    batch: int = 1  # sessions in the forward this step ran in (set by run)
    batch_pos: int = 0  # positions in that forward (set by run)
    pos_ms: float | None = None  # the worker's cost of one more padded position (Scheduler.pos_ms)
    row_med: int | None = None  # the fleet's typical draft row (Scheduler.row_med)
