"""Recording real sessions once, so that the fleet benchmark can replay them many times.

A fleet of edge devices cannot be drafted live on this machine: N draft models on one core would
measure the edges, not the worker. So each prompt is generated once for real (the draft model
drafts, the worker verifies over MQTT, sequential drafting, fixed seed), and every message the
edge sent is kept with the answer it got: a :class:`Recording`. ``bench.fleet_replay`` then sends
the same messages as many concurrent sessions. Sessions are deterministic for a seed, so the
worker must answer every replayed message exactly as it answered the recording; any difference
is a mismatch (an exactness failure under batching), counted and reported.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from shared.protocol import Close, Decode, Draft, Open, Opened, Tokens, Verdict, decode, encode

SPECULATIVE, CLOUD = "speculative", "cloud"  # the two replayable session kinds (Open.mode)


@dataclass(frozen=True)
class Step:
    """One request of a recorded session and the answer it must get again.

    ``expect`` is (n_acc, next, eos) for a draft and the streamed tokens for a decode;
    ``committed`` is how many tokens the edge committed from the answer (the last round is cut
    at ``max_new`` or an end-of-sequence token, as the edge loop does)."""

    msg: Draft | Decode
    expect: tuple[int, ...]
    committed: int
    draft_ms: float = 0.0  # the edge's drafting time for this block (0 for a decode)


@dataclass(frozen=True)
class Recording:
    """A whole generation: its ``open``, every request with its answer, the committed tokens."""

    prompt: int
    mode: str  # SPECULATIVE or CLOUD
    open: Open
    steps: tuple[Step, ...]
    tokens: tuple[int, ...]

    @property
    def rounds(self) -> int:
        return len(self.steps)

    def as_json(self) -> dict:
        """A JSON-able form (payloads as hex of their canonical CBOR), see :func:`from_json`."""
        return {
            "prompt": self.prompt,
            "mode": self.mode,
            "open": encode(self.open).hex(),
            "tokens": list(self.tokens),
            "steps": [
                {
                    "msg": encode(s.msg).hex(),
                    "expect": list(s.expect),
                    "committed": s.committed,
                    "draft_ms": round(s.draft_ms, 3),
                }
                for s in self.steps
            ],
        }

    @classmethod
    def from_json(cls, d: dict) -> Recording:
        steps = tuple(
            Step(decode(bytes.fromhex(s["msg"])), tuple(s["expect"]), s["committed"], s.get("draft_ms", 0.0))
            for s in d["steps"]
        )
        return cls(d["prompt"], d["mode"], decode(bytes.fromhex(d["open"])), steps, tuple(d["tokens"]))


def save_recordings(path: Path, recs: list[Recording]) -> None:
    path.write_text(json.dumps([r.as_json() for r in recs]))


def load_recordings(path: Path) -> list[Recording]:
    return [Recording.from_json(d) for d in json.loads(path.read_text())]


def with_sid(msg, sid: str):
    """``msg`` (a protocol message) for session ``sid``."""
    return dataclasses.replace(msg, sid=sid)


@dataclass
class RecordingLink:
    """A ``VerifierLink`` that passes everything to ``inner`` and keeps what went through it."""

    inner: object
    opens: list[Open] = field(default_factory=list)
    exchanges: list[tuple[Draft | Decode, tuple[int, ...]]] = field(default_factory=list)

    def open(self, msg: Open) -> Opened:
        self.opens.append(msg)
        return self.inner.open(msg)  # type: ignore[attr-defined]

    def verify(self, msg: Draft) -> Verdict:
        v = self.inner.verify(msg)  # type: ignore[attr-defined]
        self.exchanges.append((msg, (v.n_acc, v.next, int(v.eos))))
        return v

    def decode(self, msg: Decode) -> Iterator[Tokens]:
        got: list[int] = []
        try:
            for part in self.inner.decode(msg):  # type: ignore[attr-defined]
                got.extend(part.tok)
                yield part
        finally:  # the loop may stop reading mid-stream; what the worker sent so far is the answer
            self.exchanges.append((msg, tuple(got)))

    def close(self, msg: Close) -> None:
        self.inner.close(msg)  # type: ignore[attr-defined]

    def available(self) -> bool:
        return self.inner.available()  # type: ignore[attr-defined]

    @property
    def last(self):
        return self.inner.last  # type: ignore[attr-defined]


def _committed_counts(exchanges, total: int) -> list[int]:
    """Tokens the edge committed per exchange: n_acc + 1 per verdict, the streamed tokens per
    decode, the cumulative sum cut at ``total`` (the generation's length)."""
    out, left = [], total
    for msg, expect in exchanges:
        n = expect[0] + 1 if isinstance(msg, Draft) else len(expect)
        take = max(0, min(n, left))
        out.append(take)
        left -= take
    return out


def record_one(
    drafter, link, prompt_index: int, prompt_ids: list[int], opts, *, eos_ids: frozenset[int]
) -> Recording:
    """Generate once through ``link`` with ``opts`` (edge loop, sequential drafting) and record it.

    Raises RuntimeError when the generation needed a re-open (a resync or failover makes the
    recording non-replayable: record on a quiet worker)."""
    from edge_agent.results import collect
    from edge_agent.speculative import GenerateOptions, SessionState, generate

    opts = dataclasses.replace(opts, pipeline=False, on_cloud_unreachable="fail")
    assert isinstance(opts, GenerateOptions)
    rec = RecordingLink(link)
    state = SessionState(sid=f"rec-p{prompt_index}-{opts.mode[:5]}")
    result = collect(generate(drafter, rec, prompt_ids, opts, eos_ids=eos_ids, state=state), state=state)
    if len(rec.opens) != 1:
        raise RuntimeError(
            f"recording prompt {prompt_index} ({opts.mode}) needed {len(rec.opens)} opens (resync or "
            "failover): record against one quiet worker"
        )
    draft_ms = [r.draft_ms for r in result.rounds] if opts.mode == "speculative" else []
    counts = _committed_counts(rec.exchanges, len(result.token_ids))
    steps = tuple(
        Step(msg, expect, n, draft_ms[i] if i < len(draft_ms) else 0.0)
        for i, ((msg, expect), n) in enumerate(zip(rec.exchanges, counts, strict=True))
    )
    mode = CLOUD if opts.mode == "cloud-only" else SPECULATIVE
    return Recording(prompt_index, mode, rec.opens[0], steps, tuple(result.token_ids))


def transplant(
    acceptance: Recording,
    continuation: tuple[int, ...] | list[int],
    open_: Open,
    *,
    eos_ids: frozenset[int],
    vocab_size: int,
) -> Recording:
    """A speculative recording for THIS target, with the rounds of one made with another pair.

    ``acceptance`` is a greedy speculative recording of the same prompt made elsewhere (the demo
    pair on a CPU, say); ``continuation`` is this target's own greedy continuation of the prompt,
    at least a block longer than the generation; ``open_`` is this target's open of the prompt.
    Every round keeps its position, its γ and how many tokens were accepted; its draft tokens
    become the target's own continuation for the accepted part followed by tokens the target does
    not choose. At T = 0 the worker's verdict on each block is then known in advance (the
    recorded ``n_acc``; ``next`` = the target's token there), so the replay checks every answer
    as with a real recording. This is how the fleet benchmark runs a target whose real draft
    cannot run beside it (random weights of the demo target's shape on a GPU machine the
    weights cannot reach): the acceptance is the real pair's, round by round; the forwards,
    the batching and the transport are this worker's.

    The generation ends where ``acceptance`` did, or earlier at an end-of-sequence token of the
    continuation. Raises ValueError when the two recordings do not fit together."""
    if acceptance.mode != SPECULATIVE:
        raise ValueError(
            f"prompt {acceptance.prompt}: the acceptance recording must be speculative, got {acceptance.mode}"
        )
    ctx = open_.ctx
    if acceptance.open.ctx != ctx:
        raise ValueError(
            f"prompt {acceptance.prompt}: the acceptance recording was made on other prompt tokens "
            "(another prompts file, --num-prompts order or tokenizer): record it with the same prompts"
        )
    cont = tuple(continuation)
    total = len(acceptance.tokens)
    eos_at = next((i for i, t in enumerate(cont[:total]) if t in eos_ids), None)
    if eos_at is not None:
        total = eos_at + 1
    steps, done = [], 0
    for step in acceptance.steps:
        msg = step.msg
        if not isinstance(msg, Draft) or msg.q is not None:
            raise ValueError(
                f"prompt {acceptance.prompt}: only greedy (T = 0) draft recordings can be transplanted"
            )
        if done >= total:
            break
        c, gamma, n_acc = msg.pos - len(ctx), len(msg.tok), step.expect[0]
        if c != done:
            raise ValueError(f"prompt {acceptance.prompt}: a round at position {msg.pos} after {done} tokens")
        if c + n_acc >= len(cont):
            raise ValueError(
                f"prompt {acceptance.prompt}: the continuation has {len(cont)} tokens, the round at "
                f"{c} needs {c + n_acc + 1}: record it a block longer than the generation"
            )
        miss = (cont[c + n_acc] + 1) % vocab_size  # any token but the target's
        tok = (*cont[c : c + n_acc], *[miss] * (gamma - n_acc))
        new = cont[c : c + n_acc + 1]
        take = min(n_acc + 1, total - done)
        expect = (n_acc, cont[c + n_acc], int(any(t in eos_ids for t in new)))
        steps.append(Step(dataclasses.replace(msg, sid=open_.sid, tok=tok), expect, take, step.draft_ms))
        done += take
    return Recording(
        acceptance.prompt,
        SPECULATIVE,
        dataclasses.replace(open_, mode="speculative", max_new=acceptance.open.max_new),
        tuple(steps),
        cont[:total],
    )
