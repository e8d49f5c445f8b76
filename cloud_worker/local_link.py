"""``LocalLink``: the in-process verifier link (no network), for tests and the benchmark."""

from __future__ import annotations

from collections.abc import Iterator

from cloud_worker.verifier import Verifier
from shared.link import LinkStats
from shared.protocol import Close, Decode, Draft, Open, Opened, Tokens, Verdict


class LocalLink:
    """Implements ``shared.link.VerifierLink`` by calling a ``Verifier`` directly."""

    def __init__(self, verifier: Verifier) -> None:
        self.verifier = verifier
        self.last = LinkStats()

    def open(self, msg: Open) -> Opened:
        return self.verifier.open(msg)

    def verify(self, msg: Draft) -> Verdict:
        return self.verifier.verify(msg)

    def decode(self, msg: Decode) -> Iterator[Tokens]:
        parts: list[Tokens] = []
        self.verifier.decode(msg, parts.append)
        yield from parts

    def close(self, msg: Close) -> None:
        self.verifier.close(msg.sid, msg.epoch)

    def available(self) -> bool:
        return True
