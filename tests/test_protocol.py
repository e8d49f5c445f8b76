"""The wire protocol (shared/protocol.py): golden bytes, round-trips and strict rejection.

Spec under test (DESIGN §3, ARCHITECTURE "Messages"): one canonical CBOR map per payload with
"v": 1 and "t"; token ids as RFC 8746 typed arrays (tag 70, uint32 LE), q weights as tag 69
(uint16 LE); decode raises ProtocolError naming the field, and never any other exception.
"""

from __future__ import annotations

import dataclasses
import struct

import cbor2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared import protocol
from shared.errors import ProtocolError
from shared.protocol import (
    MAX_GAMMA,
    MAX_PAYLOAD_BYTES,
    Close,
    Decode,
    Draft,
    Error,
    Open,
    Opened,
    Tokens,
    Verdict,
    decode,
    encode,
)
from shared.sampling import SamplingParams, SparseDist

SP = SamplingParams(temperature=0.75, top_k=40, top_p=0.5, seed=1234)
GOLDEN_MSGS = {
    "open": Open(sid="sess-1", epoch=2, ctx=(151643, 9707, 11), sampling=SP, draft_model="qwen-0.5b",
                 target_model="qwen-1.5b", max_new=128, mode="speculative"),
    "opened": Opened(sid="sess-1", epoch=2, worker="w1", pos=3),
    "draft": Draft(sid="sess-1", epoch=2, seq=7, pos=3, tok=(42, 65536),
                   q=(SparseDist(ids=(42, 7), w=(40000, 25535)), SparseDist(ids=(65536,), w=(1,)))),
    "draft_greedy": Draft(sid="sess-1", epoch=2, seq=8, pos=6, tok=(1, 2, 3)),
    "verdict": Verdict(sid="sess-1", epoch=2, seq=7, n_acc=1, next=99, eos=False, verify_ms=12.5,
                       queue_ms=0.25, alpha=(0.5, 1.0)),
    "decode": Decode(sid="sess-1", epoch=2, seq=9, pos=9, n=16),
    "tokens": Tokens(sid="sess-1", epoch=2, seq=9, part=0, tok=(5, 6), done=True, eos=True, verify_ms=3.0,
                     queue_ms=0.0),
    "close": Close(sid="s1", epoch=0),
    "error": Error(sid="sess-1", code="resync", detail="unknown session", seq=7, epoch=2),
    "error_min": Error(sid="sess-1", code="overloaded", detail=""),
}  # fmt: skip

# Keys in canonical (length-first, then bytewise) order. "close", annotated:
#   a4 map(4) | 61 74 "t" 65 636c6f7365 "close" | 61 76 "v" 01 | 63 736964 "sid" 62 7331 "s1"
#   | 65 65706f6368 "epoch" 00
GOLDEN_HEX = {
    "open": "aa6174646f70656e61760163637478d8464c5b500200eb2500000b0000006373696466736573732d31646d6f64656b73"
    "706563756c61746976656565706f636802676d61785f6e657718806873616d706c696e67a464736565641904d265746f705f"
    "6b182865746f705f70f938006b74656d7065726174757265f93a006b64726166745f6d6f64656c697177656e2d302e35626c"
    "7461726765745f6d6f64656c697177656e2d312e3562",
    "opened": "a66174666f70656e656461760163706f73036373696466736573732d316565706f63680266776f726b6572627731",
    "draft": "a8617182a26177d84544409cbf6363696473d846482a00000007000000a26177d84542010063696473d846440000010061"
    "7465647261667461760163706f730363736571076373696466736573732d3163746f6bd846482a000000000001006565706f"
    "636802",
    "draft_greedy": "a7617465647261667461760163706f730663736571086373696466736573732d3163746f6bd8464c01000000020000"
    "00030000006565706f636802",
    "verdict": "aa6174677665726469637461760163656f73f463736571076373696466736573732d31646e657874186365616c70686"
    "182f93800f93c006565706f636802656e5f616363016774696d696e6773a26871756575655f6d73f93400697665726966795f6d"
    "73f94a40",
    "decode": "a7616e106174666465636f646561760163706f730963736571096373696466736573732d316565706f636802",
    "tokens": "aa617466746f6b656e7361760163656f73f563736571096373696466736573732d3163746f6bd84648050000000600000064"
    "646f6e65f56470617274006565706f6368026774696d696e6773a26871756575655f6d73f90000697665726966795f6d73f942"
    "00",
    "close": "a4617465636c6f7365617601637369646273316565706f636800",
    "error": "a76174656572726f7261760163736571076373696466736573732d3164636f646566726573796e636565706f636802666465"
    "7461696c6f756e6b6e6f776e2073657373696f6e",
    "error_min": "a56174656572726f726176016373696466736573732d3164636f64656a6f7665726c6f616465646664657461696c60",
}


def wire(msg: protocol.Message) -> dict:
    """The payload as a plain dict (typed arrays stay cbor2.CBORTag), for hand-made variants."""
    return cbor2.loads(encode(msg))


def reject(data: bytes, field: str | None = None, **kw: int) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        decode(data, **kw)
    if field is not None:
        assert info.value.field == field, info.value
    return info.value


# --- golden bytes ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(GOLDEN_MSGS))
def test_golden_bytes(name: str) -> None:
    golden = bytes.fromhex(GOLDEN_HEX[name])
    assert encode(GOLDEN_MSGS[name]) == golden
    assert decode(golden) == GOLDEN_MSGS[name]


def test_hand_built_maps_decode() -> None:
    # Built with cbor2 directly, in non-canonical key order, with float64 and int numbers.
    draft = cbor2.dumps({
        "tok": cbor2.CBORTag(70, struct.pack("<2I", 42, 65536)), "epoch": 2, "v": 1, "pos": 3, "t": "draft",
        "q": [{"w": cbor2.CBORTag(69, struct.pack("<2H", 40000, 25535)),
               "ids": cbor2.CBORTag(70, struct.pack("<2I", 42, 7))},
              {"ids": cbor2.CBORTag(70, b"\x00\x00\x01\x00"), "w": cbor2.CBORTag(69, b"\x01\x00")}],
        "seq": 7, "sid": "sess-1",
    })  # fmt: skip
    assert decode(draft) == GOLDEN_MSGS["draft"]
    verdict = cbor2.dumps({
        "v": 1, "t": "verdict", "sid": "sess-1", "epoch": 2, "seq": 7, "n_acc": 1, "next": 99, "eos": False,
        "timings": {"queue_ms": 0.25, "verify_ms": 12.5}, "alpha": [0.5, 1],
    })  # fmt: skip
    assert decode(verdict) == GOLDEN_MSGS["verdict"]
    # RFC 8746 by hand: d8 46 = tag 70, 4c = 12-byte string, three little-endian uint32.
    greedy = bytes.fromhex("a7617465647261667461760163706f730663736571086373696466736573732d31"
                           "63746f6b" "d8464c" "010000000200000003000000" "6565706f636802")  # fmt: skip
    assert decode(greedy) == GOLDEN_MSGS["draft_greedy"]


def test_encoding_is_deterministic_and_optional_fields_are_omitted() -> None:
    assert "q" not in wire(GOLDEN_MSGS["draft_greedy"])
    assert set(wire(GOLDEN_MSGS["error_min"])) == {"v", "t", "sid", "code", "detail"}
    d = GOLDEN_MSGS["verdict"]
    assert encode(Verdict(**{f.name: getattr(d, f.name) for f in dataclasses.fields(d)})) == encode(d)
    # an int given for a float field is stored (and encoded) as the float
    assert encode(Verdict(sid="a", epoch=0, seq=0, n_acc=0, next=0, eos=False, verify_ms=3, queue_ms=0)) == (
        encode(Verdict(sid="a", epoch=0, seq=0, n_acc=0, next=0, eos=False, verify_ms=3.0, queue_ms=0.0))
    )


# --- round trips -----------------------------------------------------------------------------

sids = st.from_regex(r"[A-Za-z0-9_-]{1,64}", fullmatch=True)
counts = st.integers(0, 2**31 - 1)
tids = st.integers(0, 2**32 - 1)
ms = st.floats(0, 1e7, allow_nan=False, allow_infinity=False)
names = st.text(max_size=40)
samplings = st.builds(
    SamplingParams, temperature=st.floats(0, 5, allow_nan=False), top_k=st.integers(0, 10**6),
    top_p=st.floats(0, 1, exclude_min=True), seed=st.integers(0, 2**63 - 1),
)  # fmt: skip


@st.composite
def dist_containing(draw: st.DrawFn, token: int) -> SparseDist:
    others = draw(st.lists(tids.filter(lambda i: i != token), max_size=31, unique=True))
    ids = draw(st.permutations([token, *others]))
    return SparseDist(ids=tuple(ids), w=tuple(draw(st.lists(st.integers(1, 2000), min_size=len(ids),
                                                            max_size=len(ids)))))  # fmt: skip


@st.composite
def drafts(draw: st.DrawFn) -> Draft:
    tok = draw(st.lists(tids, min_size=1, max_size=MAX_GAMMA))
    q = draw(st.none() | st.tuples(*[dist_containing(t) for t in tok]))
    return Draft(sid=draw(sids), epoch=draw(counts), seq=draw(counts), pos=draw(counts), tok=tuple(tok), q=q)


STRATEGIES = {
    Open: st.builds(Open, sid=sids, epoch=counts, ctx=st.lists(tids, min_size=1, max_size=300).map(tuple),
              sampling=samplings, draft_model=names, target_model=names, max_new=counts,
              mode=st.sampled_from(["speculative", "cloud"])),
    Opened: st.builds(Opened, sid=sids, epoch=counts, worker=st.from_regex(r"[A-Za-z0-9_.:-]{1,128}", fullmatch=True),
              pos=counts),
    Draft: drafts(),
    Verdict: st.builds(Verdict, sid=sids, epoch=counts, seq=counts, n_acc=st.integers(0, MAX_GAMMA), next=tids,
              eos=st.booleans(), verify_ms=ms, queue_ms=ms,
              alpha=st.lists(st.floats(0, 1), max_size=MAX_GAMMA + 1).map(tuple)),
    Decode: st.builds(Decode, sid=sids, epoch=counts, seq=counts, pos=counts, n=counts),
    Tokens: st.builds(Tokens, sid=sids, epoch=counts, seq=counts, part=counts, tok=st.lists(tids, max_size=100).map(tuple),
              done=st.booleans(), eos=st.booleans(), verify_ms=ms, queue_ms=ms),
    Close: st.builds(Close, sid=sids, epoch=counts),
    Error: st.builds(Error, sid=sids, code=st.sampled_from(sorted(protocol.ERROR_CODES)), detail=st.text(max_size=200),
              seq=st.none() | counts, epoch=st.none() | counts),
}  # fmt: skip
messages = st.one_of(*STRATEGIES.values())


@pytest.mark.parametrize("cls", list(STRATEGIES), ids=lambda c: c.__name__)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_round_trip(cls: type, data: st.DataObject) -> None:
    msg = data.draw(STRATEGIES[cls])
    assert type(msg) is cls
    blob = encode(msg)
    assert decode(blob) == msg
    assert encode(decode(blob)) == blob  # canonical: re-encoding gives the same bytes
