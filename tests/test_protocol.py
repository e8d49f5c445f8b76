"""The wire protocol (shared/protocol.py): golden bytes, round-trips and strict rejection.

Spec under test (DESIGN §3, ARCHITECTURE "Messages"): one canonical CBOR map per payload with
"v": 1 and "t"; token ids as RFC 8746 typed arrays (tag 70, uint32 LE), q weights as tag 69
(uint16 LE); decode raises ProtocolError naming the field, and never any other exception.
"""

from __future__ import annotations

import dataclasses
import json
import struct
from pathlib import Path

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
# fmt: off
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
}
# fmt: on

# The exact bytes of each GOLDEN_MSGS entry, as hex. Keys go in canonical (length-first, then
# bytewise) order; "close", annotated: a4 map(4) | 61 74 "t" 65 636c6f7365 "close" | 61 76 "v" 01
# | 63 736964 "sid" 62 7331 "s1" | 65 65706f6368 "epoch" 00
GOLDEN_HEX: dict[str, str] = json.loads((Path(__file__).parent / "golden" / "protocol_v1.json").read_text())


def wire(msg: protocol.Message) -> dict:
    """The payload as a plain dict (typed arrays stay cbor2.CBORTag), for hand-made variants."""
    return cbor2.loads(encode(msg))


def u32(*ids: int) -> cbor2.CBORTag:
    return cbor2.CBORTag(70, struct.pack(f"<{len(ids)}I", *ids))


def u16(*w: int) -> cbor2.CBORTag:
    return cbor2.CBORTag(69, struct.pack(f"<{len(w)}H", *w))


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
    # fmt: off
    draft = cbor2.dumps({
        "tok": u32(42, 65536), "epoch": 2, "v": 1, "pos": 3, "t": "draft", "seq": 7, "sid": "sess-1",
        "q": [{"w": u16(40000, 25535), "ids": u32(42, 7)},
              {"ids": cbor2.CBORTag(70, b"\x00\x00\x01\x00"), "w": cbor2.CBORTag(69, b"\x01\x00")}],
    })
    verdict = cbor2.dumps({
        "v": 1, "t": "verdict", "sid": "sess-1", "epoch": 2, "seq": 7, "n_acc": 1, "next": 99, "eos": False,
        "timings": {"queue_ms": 0.25, "verify_ms": 12.5}, "alpha": [0.5, 1],
    })
    # fmt: on
    assert decode(draft) == GOLDEN_MSGS["draft"]
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
samplings = st.builds(SamplingParams, temperature=st.floats(0, 5, allow_nan=False),
                      top_k=st.integers(0, 10**6), top_p=st.floats(0, 1, exclude_min=True),
                      seed=st.integers(0, 2**63 - 1))  # fmt: skip


@st.composite
def dist_containing(draw: st.DrawFn, token: int) -> SparseDist:
    others = draw(st.lists(tids.filter(lambda i: i != token), max_size=31, unique=True))
    ids = draw(st.permutations([token, *others]))
    return SparseDist(
        ids=tuple(ids), w=tuple(draw(st.lists(st.integers(1, 2000), min_size=len(ids), max_size=len(ids))))
    )


@st.composite
def drafts(draw: st.DrawFn) -> Draft:
    tok = draw(st.lists(tids, min_size=1, max_size=MAX_GAMMA))
    q = draw(st.none() | st.tuples(*[dist_containing(t) for t in tok]))
    return Draft(sid=draw(sids), epoch=draw(counts), seq=draw(counts), pos=draw(counts), tok=tuple(tok), q=q)


# fmt: off
STRATEGIES = {
    Open: st.builds(Open, sid=sids, epoch=counts, ctx=st.lists(tids, min_size=1, max_size=300).map(tuple),
                    sampling=samplings, draft_model=names, target_model=names, max_new=counts,
                    mode=st.sampled_from(["speculative", "cloud"])),
    Opened: st.builds(Opened, sid=sids, epoch=counts, pos=counts,
                      worker=st.from_regex(r"[A-Za-z0-9_.:-]{1,128}", fullmatch=True)),
    Draft: drafts(),
    Verdict: st.builds(Verdict, sid=sids, epoch=counts, seq=counts, n_acc=st.integers(0, MAX_GAMMA),
                       next=tids, eos=st.booleans(), verify_ms=ms, queue_ms=ms,
                       alpha=st.lists(st.floats(0, 1), max_size=MAX_GAMMA + 1).map(tuple)),
    Decode: st.builds(Decode, sid=sids, epoch=counts, seq=counts, pos=counts, n=counts),
    Tokens: st.builds(Tokens, sid=sids, epoch=counts, seq=counts, part=counts,
                      tok=st.lists(tids, max_size=100).map(tuple), done=st.booleans(), eos=st.booleans(),
                      verify_ms=ms, queue_ms=ms),
    Close: st.builds(Close, sid=sids, epoch=counts),
    Error: st.builds(Error, sid=sids, code=st.sampled_from(sorted(protocol.ERROR_CODES)),
                     detail=st.text(max_size=200), seq=st.none() | counts, epoch=st.none() | counts),
}
# fmt: on


@pytest.mark.parametrize("cls", list(STRATEGIES), ids=lambda c: c.__name__)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_round_trip(cls: type, data: st.DataObject) -> None:
    msg = data.draw(STRATEGIES[cls])
    assert type(msg) is cls
    blob = encode(msg)
    assert decode(blob) == msg
    assert encode(decode(blob)) == blob  # canonical: re-encoding gives the same bytes


# --- rejections ------------------------------------------------------------------------------

DRAFT_BLOB = bytes.fromhex(GOLDEN_HEX["draft"])


def test_every_truncation_is_rejected() -> None:
    for blob in (DRAFT_BLOB, bytes.fromhex(GOLDEN_HEX["open"]), bytes.fromhex(GOLDEN_HEX["verdict"])):
        for cut in range(len(blob)):
            reject(blob[:cut], "payload")


def test_trailing_bytes_are_rejected() -> None:
    assert "trailing" in reject(DRAFT_BLOB + b"\x00", "payload").detail
    reject(DRAFT_BLOB + DRAFT_BLOB, "payload")


def test_size_cap_is_checked_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_parsing(*args: object, **kwargs: object) -> None:
        raise AssertionError("the decoder ran on an oversized payload")

    reject(DRAFT_BLOB, "payload", max_size=len(DRAFT_BLOB) - 1)
    assert decode(DRAFT_BLOB, max_size=len(DRAFT_BLOB)) == GOLDEN_MSGS["draft"]
    monkeypatch.setattr(protocol.cbor2, "CBORDecoder", no_parsing)
    err = reject(b"\xa1" + b"\x00" * MAX_PAYLOAD_BYTES, "payload")
    assert str(MAX_PAYLOAD_BYTES) in err.detail


def test_encode_refuses_what_decode_would_refuse() -> None:
    huge = Open(sid="s", epoch=0, ctx=(1,) * (MAX_PAYLOAD_BYTES // 4), sampling=SP, draft_model="d",
                target_model="t", max_new=1)  # fmt: skip
    with pytest.raises(ProtocolError) as info:
        encode(huge)
    assert info.value.field == "payload"
    with pytest.raises(ProtocolError):
        encode({"v": 1, "t": "close"})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "data",
    [
        cbor2.dumps({"v": 1, "t": "close", "sid": [[[[[[[1]]]]]]], "epoch": 0}),  # deeper than MAX_DEPTH
        b"\xbf" + bytes.fromhex(GOLDEN_HEX["close"])[1:] + b"\xff",  # indefinite-length map
        bytes.fromhex("a4617465636c6f7365617601637369645f427331ff6565706f636800"),  # indefinite bytes
        bytes.fromhex("a5617465636c6f736561760161760163736964627331") + b"\x65epoch\x00",  # "v" twice
        bytes.fromhex("a4617465636c6f736561760101627331") + b"\x65epoch\x00",  # int map key
        cbor2.dumps([1, "close"]),  # not a map
        cbor2.dumps("close"),
        b"",
        b"\xff",
        b"\x62\xff\xfe",  # invalid UTF-8
    ],
    ids=["deep", "indef-map", "indef-bytes", "dup-key", "int-key", "array", "text", "empty", "break", "utf8"],
)
def test_malformed_envelopes(data: bytes) -> None:
    reject(data, "payload")


def test_non_bytes_input() -> None:
    for bad in ("a4", None, 42, [1]):
        reject(bad, "payload")  # type: ignore[arg-type]
    assert decode(bytearray(bytes.fromhex(GOLDEN_HEX["close"]))) == GOLDEN_MSGS["close"]


def test_version_and_type() -> None:
    base = wire(GOLDEN_MSGS["close"])
    for v in (2, 0, "1", 1.0, True, None):
        reject(cbor2.dumps({**base, "v": v}), "v")
    reject(cbor2.dumps({k: x for k, x in base.items() if k != "v"}), "v")
    for t in ("open2", "Close", 1, b"close", None):
        reject(cbor2.dumps({**base, "t": t}), "t")
    reject(cbor2.dumps({k: x for k, x in base.items() if k != "t"}), "t")


@pytest.mark.parametrize(
    ("name", "key", "bad"),
    [
        ("close", "sid", 5),
        ("close", "sid", "has space"),
        ("close", "sid", cbor2.CBORTag(999, "s1")),  # unknown tag
        ("close", "epoch", -1),
        ("close", "epoch", 1.0),
        ("close", "epoch", True),
        ("close", "epoch", 2**31),  # ids and counts out of range
        ("verdict", "next", 2**32),
        ("verdict", "n_acc", MAX_GAMMA + 1),
        ("verdict", "eos", 0),
        ("verdict", "alpha", [0.5, "x"]),
        ("verdict", "alpha", [-0.5]),
        ("verdict", "alpha", [0.5] * (MAX_GAMMA + 2)),
        ("opened", "worker", "a/b"),
        ("opened", "pos", "3"),
        ("draft", "tok", [42, 7]),  # a plain array, not a typed array
        ("draft", "tok", cbor2.CBORTag(70, b"\x01\x00\x00")),  # length not a multiple of 4
        ("draft", "tok", cbor2.CBORTag(69, b"\x01\x00\x02\x00")),  # wrong element type
        ("draft", "tok", cbor2.CBORTag(70, b"")),  # γ = 0
        ("draft", "tok", cbor2.CBORTag(70, b"\x00" * 4 * (MAX_GAMMA + 1))),  # γ too large
        ("draft", "tok", cbor2.CBORTag(70, "abcd")),
        ("draft", "q", {"ids": 1}),
        ("draft", "q", [{"ids": u32(42), "w": u16(1)}]),  # one q for two tokens
        ("draft", "q", None),
        ("open", "mode", "edge"),
        ("open", "ctx", cbor2.CBORTag(70, b"")),
        ("open", "sampling", [0.5, 1]),
        ("open", "draft_model", b"name"),
        ("open", "max_new", None),
        ("error", "code", "oops"),
        ("error", "seq", None),
        ("tokens", "timings", 3.0),
        ("tokens", "done", "yes"),
        ("decode", "n", 2**64 - 1),
    ],
)
def test_mistyped_or_out_of_range_field_is_named(name: str, key: str, bad: object) -> None:
    reject(cbor2.dumps({**wire(GOLDEN_MSGS[name]), key: bad}), key)


Q1 = {"ids": u32(65536), "w": u16(1)}  # a valid q[1] of GOLDEN_MSGS["draft"]


def sampling(**kw: object) -> dict:
    return {
        k: v for k, v in {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "seed": 0, **kw}.items() if v != "-"
    }


# fmt: off
NESTED_CASES = [
    ("draft", {"q": [{"ids": u32(42), "w": cbor2.CBORTag(69, b"\x01")}, Q1]}, "q.w"),  # odd length
    ("draft", {"q": [{"ids": u32(42), "w": u16(0)}, Q1]}, "q.w"),  # zero weight
    ("draft", {"q": [{"ids": u32(42), "w": u16(40000, 30000)}, Q1]}, "q"),  # lengths differ
    ("draft", {"q": [{"ids": u32(42, 7), "w": u16(40000, 30000)}, Q1]}, "q.w"),  # sum over 65535
    ("draft", {"q": [{"ids": [42], "w": u16(1)}, Q1]}, "q.ids"),
    ("draft", {"q": [{"ids": u32(42), "w": u32(1)}, Q1]}, "q.w"),  # weights in the wrong tag
    ("draft", {"q": [{"ids": u32(42)}, Q1]}, "q.w"),
    ("draft", {"q": [{"ids": u32(42), "w": u16(1), "p": 1}, Q1]}, "q.p"),
    ("open", {"sampling": sampling(temperature=-1.0)}, "sampling.temperature"),
    ("open", {"sampling": sampling(top_p="1")}, "sampling.top_p"),
    ("open", {"sampling": sampling(top_p=0.0)}, "sampling.top_p"),
    ("open", {"sampling": sampling(seed=1.5)}, "sampling.seed"),
    ("open", {"sampling": sampling(seed="-")}, "sampling.seed"),
    ("open", {"sampling": sampling(x=1)}, "sampling.x"),
    ("verdict", {"timings": {"verify_ms": 1.0}}, "timings.queue_ms"),
    ("verdict", {"timings": {"verify_ms": float("nan"), "queue_ms": 0.0}}, "verify_ms"),
    ("verdict", {"timings": {"verify_ms": 1.0, "queue_ms": -2.0}}, "queue_ms"),
    ("close", {"extra": 1}, "extra"),  # unknown keys are rejected, not ignored
    ("opened", {"q": None}, "q"),
]
# fmt: on


@pytest.mark.parametrize(("name", "patch", "field"), NESTED_CASES)
def test_nested_fields_are_named(name: str, patch: dict, field: str) -> None:
    reject(cbor2.dumps({**wire(GOLDEN_MSGS[name]), **patch}), field)


@pytest.mark.parametrize("name", sorted(GOLDEN_MSGS))
def test_missing_required_field_is_named(name: str) -> None:
    base = wire(GOLDEN_MSGS[name])
    for key in base.keys() - {"v", "t"}:
        if (type(GOLDEN_MSGS[name]), key) in protocol._OPTIONAL:
            continue
        reject(cbor2.dumps({k: x for k, x in base.items() if k != key}), key)


@pytest.mark.parametrize(
    "tagged",
    [cbor2.CBORTag(2, b"\x01"), cbor2.CBORTag(28, 1), cbor2.CBORTag(55799, 1), cbor2.CBORTag(1, 0)],
    ids=["bignum", "shareable", "self-describe", "epoch-datetime"],
)
def test_builtin_semantic_tags_are_refused(tagged: cbor2.CBORTag) -> None:
    reject(cbor2.dumps({**wire(GOLDEN_MSGS["close"]), "epoch": tagged}))


# --- validation at construction --------------------------------------------------------------


def draft(**kw: object) -> Draft:
    return Draft(**{"sid": "s", "epoch": 0, "seq": 0, "pos": 0, "tok": (1,), **kw})  # type: ignore[arg-type]


def verdict(**kw: object) -> Verdict:
    base = {"sid": "s", "epoch": 0, "seq": 0, "n_acc": 0, "next": 0, "eos": False, "verify_ms": 0}
    return Verdict(**{**base, "queue_ms": 0, **kw})  # type: ignore[arg-type]


def open_(**kw: object) -> Open:
    base = {"sid": "s", "epoch": 0, "ctx": (1,), "sampling": SP, "draft_model": "d", "target_model": "t"}
    return Open(**{**base, "max_new": 1, **kw})  # type: ignore[arg-type]


# fmt: off
CONSTRUCTOR_CASES = [
    (lambda: Close(sid="", epoch=0), "sid"),
    (lambda: Close(sid="x" * 65, epoch=0), "sid"),
    (lambda: Close(sid="a.b", epoch=0), "sid"),
    (lambda: Close(sid="s", epoch=2**31), "epoch"),
    (lambda: draft(tok=()), "tok"),
    (lambda: draft(tok=(1,) * (MAX_GAMMA + 1)), "tok"),
    (lambda: draft(tok=(2**32,)), "tok"),
    (lambda: draft(tok=(-1,)), "tok"),
    (lambda: draft(tok=(True,)), "tok"),
    (lambda: draft(tok="ab"), "tok"),
    (lambda: draft(seq=1.0), "seq"),
    (lambda: draft(tok=(1, 2), q=(SparseDist(ids=(1,), w=(1,)),)), "q"),
    (lambda: draft(q=(SparseDist(ids=(2,), w=(1,)),)), "q"),  # x_1 outside the support of q_1
    (lambda: draft(q=((1,),)), "q"),
    (lambda: Opened(sid="s", epoch=0, worker="", pos=0), "worker"),
    (lambda: Opened(sid="s", epoch=0, worker="w/1", pos=0), "worker"),
    (lambda: Opened(sid="s", epoch=-1, worker="w", pos=0), "epoch"),
    (lambda: verdict(eos=1), "eos"),
    (lambda: verdict(verify_ms=float("inf")), "verify_ms"),
    (lambda: verdict(queue_ms=True), "queue_ms"),
    (lambda: verdict(n_acc=MAX_GAMMA + 1), "n_acc"),
    (lambda: verdict(next=2**32), "next"),
    (lambda: verdict(alpha=(float("nan"),)), "alpha"),
    (lambda: Tokens(sid="s", epoch=0, seq=0, part=0, tok=(), done=True, eos=False, verify_ms=0,
                    queue_ms=-1e-9), "queue_ms"),
    (lambda: open_(ctx=()), "ctx"),
    (lambda: open_(sampling={}), "sampling"),
    (lambda: open_(mode="edge"), "mode"),
    (lambda: open_(mode=["cloud"]), "mode"),
    (lambda: open_(draft_model=None), "draft_model"),
    (lambda: open_(max_new=-1), "max_new"),
    (lambda: Decode(sid="s", epoch=0, seq=0, pos=0, n=2**31), "n"),
    (lambda: Error(sid="s", code="nope", detail=""), "code"),
    (lambda: Error(sid="s", code="internal", detail="x" * 5000), "detail"),
    (lambda: Error(sid="s", code="internal", detail="", seq=-1), "seq"),
]
# fmt: on


@pytest.mark.parametrize(("make", "field"), CONSTRUCTOR_CASES)
def test_constructor_validation_names_the_field(make: object, field: str) -> None:
    with pytest.raises(ProtocolError) as info:
        make()  # type: ignore[operator]
    assert info.value.field == field


def test_lists_are_stored_as_tuples() -> None:
    d = Draft(sid="s", epoch=0, seq=0, pos=0, tok=[3, 3], q=[SparseDist(ids=(3,), w=(1,))] * 2)
    assert d.tok == (3, 3) and isinstance(d.q, tuple)
    assert hash(d) == hash(draft(sid="s", tok=(3, 3), q=(SparseDist(ids=(3,), w=(1,)),) * 2))


# --- fuzzing: only ProtocolError or a valid message may come out ------------------------------


def decode_or_protocol_error(data: bytes) -> None:
    try:
        msg = decode(data)
    except ProtocolError:
        return
    assert decode(encode(msg)) == msg


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes(data: bytes) -> None:
    decode_or_protocol_error(data)


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(sorted(GOLDEN_HEX)),
    st.lists(st.tuples(st.sampled_from(["set", "insert", "delete"]), st.integers(0, 10**6),
                       st.integers(0, 255)), min_size=1, max_size=4),
)  # fmt: skip
def test_mutated_valid_encodings(name: str, edits: list[tuple[str, int, int]]) -> None:
    data = bytearray.fromhex(GOLDEN_HEX[name])
    for op, pos, byte in edits:
        pos %= len(data) + (op == "insert")
        if op == "set":
            data[pos] = byte
        elif op == "insert":
            data.insert(pos, byte)
        elif len(data) > 1:
            del data[pos]
    decode_or_protocol_error(bytes(data))
