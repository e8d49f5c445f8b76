"""The interface between the edge's speculative loop and a verifier (DESIGN §1).

Two implementations: ``cloud_worker.local_link.LocalLink`` wraps a verifier in-process, and
``edge_agent.mqtt_link.MqttLink`` speaks the protocol through the broker. The loop in
``edge_agent.speculative`` runs unchanged over either, which keeps their comparison honest.

Failure contract: a link raises ``SessionError(code="resync")`` when the verifier lost the session
(evicted or unknown) and ``SessionError(code="worker_lost")`` when its owner is gone (its status
left ``online``, or no answer after the deadline and one retry): the loop then re-opens with
``epoch + 1``, the full committed context and the tokens still wanted. It raises ``BrokerError``
when the broker cannot be reached and ``CloudUnavailableError`` when no worker can take the
session (none online, or no answer to the open), as soon as it knows; the loop then applies the
cloud-unreachable policy. A worker refusing an open because it is shutting down (``overloaded``)
is the link's business: it opens elsewhere.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

from shared.protocol import Close, Decode, Draft, Open, Opened, Tokens, Verdict


@dataclass(frozen=True, slots=True)
class LinkStats:
    """What the last request cost on the link: payload bytes each way and encode+decode time."""

    bytes_up: int = 0
    bytes_down: int = 0
    codec_ms: float = 0.0


class VerifierLink(Protocol):
    """What the edge loop needs from a verifier, local or remote."""

    def open(self, msg: Open) -> Opened:
        """Open (or re-open with a higher epoch) a session: the owner prefills ``msg.ctx``."""
        ...

    def verify(self, msg: Draft) -> Verdict:
        """Judge one draft block in one target forward pass."""
        ...

    def decode(self, msg: Decode) -> Iterator[Tokens]:
        """Cloud-only: the owner decodes with the target alone and streams the tokens back."""
        ...

    def close(self, msg: Close) -> None:
        """Forget the session (best effort, never raises for an unknown session)."""
        ...

    def available(self) -> bool:
        """Whether the cloud is reachable right now (used to leave fallback mode)."""
        ...

    @property
    def last(self) -> LinkStats:
        """The cost of the last request and its reply(ies); all zero in-process."""
        ...
