"""The local API never ignores an option, bounds what a request can cost, and stops work nobody
waits for (issue 11 item 11, issue 10 attacks 8-10). Tiny real models behind real uvicorn."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from collections.abc import Iterator

import openai
import pytest
import torch

from cloud_worker.local_link import LocalLink
from cloud_worker.verifier import Verifier
from edge_agent.api import create_app, start_server
from shared.sampling import GREEDY_BELOW, SamplingParams, logits_to_probs
from tests.test_api import MODEL, get_text, make_agent, models, post  # noqa: F401  (models: fixture)


@pytest.fixture(scope="module")
def server(models) -> Iterator:  # noqa: F811
    app = create_app(make_agent(models), model_name=MODEL, max_queue=4, max_concurrent=2, aliases=["tiny"],
                     max_body_bytes=4096)  # fmt: skip
    handle = start_server(app)
    try:
        yield handle
    finally:
        handle.stop()


@pytest.fixture
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=60)


CHAT = [{"role": "user", "content": "hello there"}]
REFUSED = [
    ("logprobs", True, "chat"),
    ("logprobs", 2, "completion"),
    ("top_logprobs", 3, "chat"),
    ("echo", True, "completion"),
    ("response_format", {"type": "json_object"}, "chat"),
    ("tools", [{"type": "function", "function": {"name": "f"}}], "chat"),
    ("tool_choice", "auto", "chat"),
    ("frequency_penalty", 0.5, "chat"),
    ("presence_penalty", -1, "completion"),
    ("min_p", 0.1, "completion"),
    ("logit_bias", {"1": 5}, "completion"),
    ("best_of", 2, "completion"),
    ("suffix", "end", "completion"),
    ("reasoning_effort", "high", "chat"),
    ("typo_field", 1, "chat"),
]


def body_of(kind: str, **extra) -> tuple[str, dict]:
    if kind == "chat":
        return "/chat/completions", {"model": MODEL, "messages": CHAT, "max_tokens": 4, **extra}
    return "/completions", {"model": MODEL, "prompt": "hello", "max_tokens": 4, **extra}


@pytest.mark.parametrize(("name", "value", "kind"), REFUSED, ids=[r[0] + "-" + r[2] for r in REFUSED])
def test_unimplemented_options_are_refused_by_name(server, name, value, kind) -> None:
    path, body = body_of(kind, **{name: value})
    code, err, _ = post(server.url + path, body)
    assert code == 400, err
    assert err["error"]["param"] == name and name in err["error"]["message"]


@pytest.mark.parametrize(
    ("name", "value"),
    [("logprobs", False), ("frequency_penalty", 0), ("presence_penalty", 0.0), ("response_format", {"type": "text"}),
     ("tools", []), ("user", "u-1"), ("echo", False)],
)  # fmt: skip
def test_neutral_values_are_accepted(server, name, value) -> None:
    path, body = body_of("chat" if name in ("response_format", "tools") else "completion", **{name: value})
    code, ok, _ = post(server.url + path, body)
    assert code == 200, ok


def test_misspelt_spececd_option_is_refused(server) -> None:
    path, body = body_of("chat", spececd={"gama": 3})
    code, err, _ = post(server.url + path, body)
    assert code == 400 and err["error"]["param"] == "spececd.gama"
    path, body = body_of("chat", spececd={"gamma": 64})  # the config's range: 1..64
    assert post(server.url + path, body)[0] == 200


def test_top_k_is_implemented(client) -> None:
    kw = dict(model=MODEL, prompt="The edge device runs", max_tokens=12)
    greedy = client.completions.create(temperature=0, **kw).choices[0].text
    sampled = (
        client.completions.create(temperature=1.5, seed=3, extra_body={"top_k": 1}, **kw).choices[0].text
    )
    assert sampled == greedy  # top-1 sampling is greedy whatever the temperature


def test_stream_usage_only_when_asked_once_in_a_last_chunk(client) -> None:
    kw = dict(model=MODEL, messages=CHAT, max_tokens=8, temperature=0, stream=True)
    plain = list(client.chat.completions.create(**kw))
    assert all(c.usage is None for c in plain)
    with_usage = list(client.chat.completions.create(stream_options={"include_usage": True}, **kw))
    usage = [c for c in with_usage if c.usage is not None]
    assert len(usage) == 1 and usage[0] is with_usage[-1] and with_usage[-1].choices == []
    assert usage[0].usage.completion_tokens > 0
    code, err, _ = post(client.base_url.__str__().rstrip("/") + "/chat/completions",
                        {"model": MODEL, "messages": CHAT, "stream_options": {"include_usage": True}})  # fmt: skip
    assert code == 400 and err["error"]["param"] == "stream_options"


def test_models_lists_the_served_name(client) -> None:
    assert [m.id for m in client.models.list()] == [MODEL]


def test_body_over_the_limit_is_413(server) -> None:
    big = {"model": MODEL, "prompt": "x" * 5000}
    code, err, _ = post(server.url + "/completions", big)
    assert code == 413 and err["error"]["code"] == "request_too_large"
    # chunked (no Content-Length): refused once the limit is passed
    conn = http.client.HTTPConnection(server.host, server.port, timeout=30)
    chunks = [json.dumps(big).encode()[i : i + 1000] for i in range(0, 6000, 1000)]
    conn.request("POST", "/v1/completions", body=iter(chunks), headers={"Content-Type": "application/json"},
                 encode_chunked=True)  # fmt: skip
    resp = conn.getresponse()
    assert resp.status == 413
    conn.close()


def test_tokenizing_runs_off_the_event_loop(models) -> None:  # noqa: F811
    agent = make_agent(models)
    real = agent.encode_prompt

    def slow_encode(text, chat=True):
        time.sleep(3.0)  # a huge prompt's tokenization
        return real(text, chat=chat)

    agent.encode_prompt = slow_encode  # type: ignore[method-assign]
    handle = start_server(create_app(agent, model_name=MODEL, max_queue=2))
    try:
        t = threading.Thread(target=post, args=(handle.url + "/completions", {"model": MODEL, "prompt": "hi",
                                                                              "max_tokens": 2}))  # fmt: skip
        t.start()
        time.sleep(0.5)
        t0 = time.monotonic()
        health = json.loads(get_text(f"http://{handle.host}:{handle.port}/health"))
        assert health["model"] == MODEL
        assert time.monotonic() - t0 < 1.5, "/health waited for a tokenization"
        t.join(30)
    finally:
        handle.stop()


def test_requests_waiting_for_the_tokenizer_are_bounded(models) -> None:  # noqa: F811
    agent = make_agent(models)
    real = agent.encode_prompt

    def slow_encode(text, chat=True):
        time.sleep(3.0)
        return real(text, chat=chat)

    agent.encode_prompt = slow_encode  # type: ignore[method-assign]
    app = create_app(agent, model_name=MODEL, max_queue=1)
    handle = start_server(app)
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 2}
    try:
        first: list = []
        t = threading.Thread(target=lambda: first.append(post(handle.url + "/completions", body)[0]))
        t.start()
        deadline = time.monotonic() + 10
        while app.state.api.parsing < 1:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        code, err, headers = post(handle.url + "/completions", body)
        assert code == 429 and err["error"]["code"] == "queue_full" and headers["Retry-After"]
        t.join(30)
        assert first == [200]
    finally:
        handle.stop()


def test_tiny_temperature_is_greedy_on_both_sides(client) -> None:
    kw = dict(model=MODEL, prompt="Water boils at", max_tokens=12)
    greedy = client.completions.create(temperature=0, **kw).choices[0].text
    tiny = client.completions.create(temperature=1e-45, seed=1, **kw).choices[0].text
    assert tiny == greedy
    logits = torch.tensor([[1.0, 3.0, 2.0], [0.5, 0.5, -1.0]])
    for t in (1e-45, 1e-38, GREEDY_BELOW / 2):
        p = logits_to_probs(logits, SamplingParams(temperature=t))
        assert torch.equal(p, logits_to_probs(logits, SamplingParams(temperature=0.0)))
    above = logits_to_probs(logits, SamplingParams(temperature=GREEDY_BELOW))
    assert torch.isfinite(above).all() and not SamplingParams(temperature=GREEDY_BELOW).greedy


class CountingLink(LocalLink):
    """The in-process link, slowed down and counting its verify calls."""

    def __init__(self, verifier: Verifier) -> None:
        super().__init__(verifier)
        self.calls = 0

    def verify(self, msg):
        self.calls += 1
        time.sleep(0.05)
        return super().verify(msg)


def test_a_dropped_non_streaming_request_stops_its_generation(models) -> None:  # noqa: F811
    link = CountingLink(Verifier(models[1], worker_id="w", max_sessions=4))
    agent = make_agent(models, link)
    app = create_app(agent, model_name=MODEL, max_queue=2)
    handle = start_server(app)
    try:
        body = json.dumps({"model": MODEL, "prompt": "go", "max_tokens": 400, "temperature": 0,
                           "spececd": {"gamma": 1}}).encode()  # fmt: skip
        sock = socket.create_connection((handle.host, handle.port))
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)  # fmt: skip
        deadline = time.monotonic() + 30
        while link.calls < 3:
            assert time.monotonic() < deadline, "generation never started"
            time.sleep(0.02)
        sock.close()  # the client goes away
        deadline = time.monotonic() + 10
        while app.state.api.gate.active:
            assert time.monotonic() < deadline, (
                f"still generating after the client left ({link.calls} rounds)"
            )
            time.sleep(0.05)
        assert link.calls < 100  # 400 tokens at gamma 1 would take ~200+ rounds
    finally:
        handle.stop()
