"""The edge's OpenAI-compatible API, through the official ``openai`` client and raw HTTP.

The agent runs tiny real models behind a real uvicorn server on a free port: with the
in-process verifier (``LocalLink``), and at the end through a real Mosquitto and a worker.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from cloud_worker.local_link import LocalLink
from cloud_worker.verifier import Verifier
from cloud_worker.worker import Worker
from edge_agent.agent import EdgeAgent
from edge_agent.api import create_app, start_server
from edge_agent.mqtt_link import MqttLink
from edge_agent.speculative import GenerateOptions
from shared.metrics import WorkerMetrics
from shared.models import load_model
from shared.sampling import SamplingParams
from tests.tiny import make_tiny_model_dir

MODEL = "tiny-spec"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("api-models")
    draft = load_model(str(make_tiny_model_dir(root / "draft", seed=1, layers=1)))
    target = load_model(str(make_tiny_model_dir(root / "target", seed=2)))
    draft.tokenizer.chat_template = CHAT_TEMPLATE
    return draft, target


def make_agent(models, link=None, **defaults) -> EdgeAgent:
    draft, target = models
    link = link if link is not None else LocalLink(Verifier(target, worker_id="w", max_sessions=8))
    opts = GenerateOptions(gamma=4, max_new_tokens=24, params=SamplingParams(temperature=0.0), **defaults)
    return EdgeAgent(draft, link, defaults=opts)


@pytest.fixture(scope="module")
def server(models) -> Iterator:
    app = create_app(make_agent(models), model_name=MODEL, max_queue=4, max_concurrent=2, aliases=["tiny"])
    handle = start_server(app)
    try:
        yield handle
    finally:
        handle.stop()


@pytest.fixture
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=60)


def post(url: str, body: bytes | dict, timeout: float = 60) -> tuple[int, dict, Any]:
    """POST raw JSON; returns (status, parsed body, headers) for 2xx and 4xx/5xx alike."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read()), resp.headers
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read()), exc.headers


def get_text(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return resp.read().decode()


# ------------------------------------------------------------------ happy paths
def test_completion_stream_equals_non_stream(client) -> None:
    kw = dict(model=MODEL, prompt="The edge device runs", max_tokens=20, temperature=0)
    full = client.completions.create(**kw)
    text = full.choices[0].text
    assert text and full.choices[0].finish_reason in ("stop", "length")
    assert full.usage.completion_tokens > 0
    assert full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens
    ext = full.model_extra["spececd"]
    assert ext["mode"] == "speculative" and ext["rounds"] > 0 and ext["drafted"] >= ext["accepted"]
    assert ext["new_tokens"] == full.usage.completion_tokens
    chunks = list(client.completions.create(stream=True, **kw))
    assert "".join(c.choices[0].text for c in chunks) == text
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason
    assert chunks[-1].model_extra["spececd"]["new_tokens"] == full.usage.completion_tokens
    assert len(chunks) > 2  # really streamed, not one blob


def test_chat_stream_equals_non_stream(client) -> None:
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What does MQTT carry?"},
    ]
    full = client.chat.completions.create(model="tiny", messages=messages, max_tokens=16, temperature=0)
    msg = full.choices[0].message
    assert msg.role == "assistant" and msg.content
    assert full.object == "chat.completion" and full.model == MODEL
    stream = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=16, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == msg.content
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_stop_sequence_ends_the_text_and_is_not_included(client) -> None:
    kw = dict(model=MODEL, prompt="Water boils at", max_tokens=24, temperature=0)
    text = client.completions.create(**kw).choices[0].text
    assert len(text) > 6
    stop = text[3:6]  # a stop sequence that occurs in the unconstrained text
    want = text[: text.index(stop)]
    got = client.completions.create(stop=[stop, "\x00never"], **kw).choices[0]
    assert got.text == want and got.finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(stop=stop, stream=True, **kw))
    assert streamed == want


def test_seeded_sampling_is_reproducible(client) -> None:
    kw = dict(model=MODEL, prompt="The capital of", max_tokens=16, temperature=1.0, seed=7)
    a = client.completions.create(**kw).choices[0].text
    b = "".join(c.choices[0].text for c in client.completions.create(stream=True, **kw))
    assert a == b


def test_models_and_health(client, server) -> None:
    ids = [m.id for m in client.models.list()]
    assert ids == [MODEL]  # the served name only; the alias "tiny" is still accepted
    assert client.models.retrieve(MODEL).id == MODEL
    health = json.loads(get_text(f"http://{server.host}:{server.port}/health"))
    assert health["status"] == "ok" and health["cloud"] == "up" and health["model"] == MODEL


def test_edge_metrics_move_with_generations(client, server) -> None:
    def samples() -> dict:
        text = get_text(f"http://{server.host}:{server.port}/metrics")
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text)
            for s in fam.samples
        }

    before = samples()
    client.completions.create(model=MODEL, prompt="Speculative decoding", max_tokens=12, temperature=0)
    after = samples()

    def delta(name: str, **labels) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert delta("spececd_edge_rounds_total") > 0
    assert delta("spececd_edge_generations_total", mode="speculative") == 1
    assert delta("spececd_edge_drafted_tokens_total") >= delta("spececd_edge_accepted_tokens_total")
    assert delta("spececd_edge_position_judged_total", position="0") > 0
    assert delta("spececd_edge_round_seconds_count") == delta("spececd_edge_rounds_total")
    assert delta("spececd_edge_http_requests_total", endpoint="/v1/completions", status="200") == 1
    assert after[("spececd_edge_requests_in_flight", ())] == 0
    tokens = sum(delta("spececd_edge_tokens_total", source=s) for s in ("draft", "target"))
    assert tokens > 0


# ------------------------------------------------------------------ errors
BAD = [
    ("missing prompt", "/completions", {"model": MODEL}, 400, "prompt"),
    ("missing messages", "/chat/completions", {"model": MODEL}, 400, "messages"),
    ("missing model", "/completions", {"prompt": "hi"}, 400, "model"),
    ("negative max_tokens", "/completions", {"model": MODEL, "prompt": "hi", "max_tokens": -1}, 400, "max_tokens"),
    ("bad temperature", "/completions", {"model": MODEL, "prompt": "hi", "temperature": "hot"}, 400, "temperature"),
    ("bad role", "/chat/completions", {"model": MODEL, "messages": [{"role": "x", "content": "hi"}]}, 400, "messages[0]"),
    ("unknown model", "/completions", {"model": "gpt-nope", "prompt": "hi"}, 404, "model"),
    ("too long", "/completions", {"model": MODEL, "prompt": "zq " * 700}, 400, "prompt"),
]  # fmt: skip


@pytest.mark.parametrize(("what", "path", "body", "status", "param"), BAD, ids=[b[0] for b in BAD])
def test_bad_requests_get_openai_errors_and_the_agent_keeps_serving(
    server, what, path, body, status, param
) -> None:
    code, err, _ = post(server.url + path, body)
    assert code == status, err
    assert set(err["error"]) == {"message", "type", "param", "code"}
    assert err["error"]["param"] == param and err["error"]["message"]
    if what == "unknown model":
        assert err["error"]["code"] == "model_not_found"
    if what == "too long":
        assert err["error"]["code"] == "context_length_exceeded"
    code, ok, _ = post(server.url + "/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 3})
    assert code == 200 and ok["usage"]["completion_tokens"] > 0


def test_malformed_json_and_unknown_route(server, client) -> None:
    code, err, _ = post(server.url + "/chat/completions", b'{"model": "tiny-spec", "messages": [')
    assert code == 400 and err["error"]["code"] == "invalid_json"
    with pytest.raises(urllib.error.HTTPError) as exc:
        get_text(server.url + "/nothing-here")
    assert exc.value.code == 404 and "error" in json.loads(exc.value.read())
    with pytest.raises(openai.NotFoundError) as nf:
        client.chat.completions.create(model="gpt-nope", messages=[{"role": "user", "content": "hi"}])
    assert nf.value.code == "model_not_found"


# ------------------------------------------------------------------ queue and cloud down
class GatedLink(LocalLink):
    """The in-process link, but every verify waits until ``gate`` is set."""

    def __init__(self, verifier: Verifier, gate: threading.Event) -> None:
        super().__init__(verifier)
        self.gate, self.entered = gate, threading.Semaphore(0)

    def verify(self, msg):
        self.entered.release()
        assert self.gate.wait(30), "test gate never opened"
        return super().verify(msg)


def test_queue_full_is_429_with_retry_after(models) -> None:
    gate = threading.Event()
    link = GatedLink(Verifier(models[1], worker_id="w", max_sessions=8), gate)
    app = create_app(make_agent(models, link), model_name=MODEL, max_queue=1, max_concurrent=1)
    handle = start_server(app)
    body = {"model": MODEL, "prompt": "hello", "max_tokens": 4}
    results: list[int] = []
    threads = [threading.Thread(target=lambda: results.append(post(handle.url + "/completions", body)[0]))]
    try:
        threads[0].start()
        assert link.entered.acquire(timeout=30)  # request 1 generates (blocked in verify)
        threads.append(
            threading.Thread(target=lambda: results.append(post(handle.url + "/completions", body)[0]))
        )
        threads[1].start()
        deadline = time.monotonic() + 10
        while app.state.api.gate.waiting < 1:  # request 2 waits in the queue
            assert time.monotonic() < deadline, "second request never queued"
            time.sleep(0.01)
        code, err, headers = post(handle.url + "/completions", body)
        assert code == 429 and err["error"]["code"] == "queue_full"
        assert int(headers["Retry-After"]) >= 1
        health = json.loads(get_text(f"http://{handle.host}:{handle.port}/health"))
        assert (health["in_flight"], health["queued"]) == (1, 1)
    finally:
        gate.set()
        for t in threads:
            t.join(30)
        handle.stop()
    assert results == [200, 200]


class DownLink(LocalLink):
    def available(self) -> bool:
        return False


def test_cloud_down_with_fail_policy_is_503(models) -> None:
    link = DownLink(Verifier(models[1], worker_id="w", max_sessions=2))
    agent = make_agent(models, link, on_cloud_unreachable="fail")
    handle = start_server(create_app(agent, model_name=MODEL, max_queue=2))
    try:
        code, err, headers = post(handle.url + "/completions", {"model": MODEL, "prompt": "hi"})
        assert code == 503 and err["error"]["code"] == "cloud_unavailable" and "Retry-After" in headers
        body = {"model": MODEL, "prompt": "hi", "max_tokens": 3, "spececd": {"mode": "edge-only"}}
        code, ok, _ = post(handle.url + "/completions", body)  # the draft alone still works
        assert code == 200 and ok["spececd"]["mode"] == "edge-only" and ok["spececd"]["rounds"] == 0
    finally:
        handle.stop()


# ------------------------------------------------------------------ through Mosquitto and a worker
@pytest.fixture
def mqtt_server(models, dev_broker, uid) -> Iterator:
    """The API over a real MqttLink to a real worker (in a thread) with its own WorkerMetrics."""
    metrics = WorkerMetrics()
    worker = Worker(models[1], dev_broker.config(), worker_id=f"w-{uid}", metrics=metrics)
    worker.start()
    link = MqttLink(dev_broker.config(), device=uid, round_timeout_s=5.0, open_timeout_s=5.0)
    link.connect()
    agent = make_agent(models, link)
    handle = start_server(create_app(agent, model_name=MODEL, max_queue=4))
    http, _ = metrics.serve("127.0.0.1", 0)
    try:
        yield handle, worker, http
    finally:
        handle.stop()
        agent.close()
        worker.stop()
        http.shutdown()
        http.server_close()


def test_through_mqtt_stream_equals_non_stream_and_in_process(server, mqtt_server) -> None:
    handle, worker, http = mqtt_server
    remote = openai.OpenAI(base_url=handle.url, api_key="unused", max_retries=0, timeout=60)
    local = openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=60)
    kw = dict(model=MODEL, prompt="MQTT carries CBOR", max_tokens=16, temperature=0)
    full = remote.completions.create(**kw)
    assert full.choices[0].text == local.completions.create(**kw).choices[0].text
    assert full.model_extra["spececd"]["rounds"] > 0
    assert (
        "".join(c.choices[0].text for c in remote.completions.create(stream=True, **kw))
        == full.choices[0].text
    )

    chat = dict(
        model=MODEL, messages=[{"role": "user", "content": "Where is Paris?"}], max_tokens=12, temperature=0
    )
    answer = remote.chat.completions.create(**chat).choices[0].message.content
    assert answer == local.chat.completions.create(**chat).choices[0].message.content
    streamed = "".join(
        c.choices[0].delta.content or "" for c in remote.chat.completions.create(stream=True, **chat)
    )
    assert streamed == answer

    text = get_text(f"http://127.0.0.1:{http.server_port}/metrics")
    values = {
        s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples if not s.labels
    }
    assert values["spececd_worker_sessions_opened_total"] >= 4  # one per generation
    assert values["spececd_worker_verifications_total"] > 0
    assert values["spececd_worker_drafted_tokens_total"] >= values["spececd_worker_accepted_tokens_total"]
    assert values["spececd_worker_verify_seconds_count"] == values["spececd_worker_verifications_total"]
    assert not worker.bad_messages
