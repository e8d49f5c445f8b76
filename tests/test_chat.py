"""``edge_agent.chat`` (the stdlib API client, the chat REPL) and the ``spececd-edge`` serve, chat
and ``generate --url`` subcommands, against a real served agent."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from edge_agent.api import create_app, start_server
from edge_agent.chat import ApiClientError, api_base, chat_repl, generate_via_api
from tests.brokers import free_port
from tests.test_api import MODEL, make_agent, models  # noqa: F401  (models is a fixture)
from tests.workers import ROOT


@pytest.fixture(scope="module")
def agent(models):  # noqa: F811
    return make_agent(models)


@pytest.fixture(scope="module")
def url(agent) -> Iterator[str]:
    handle = start_server(create_app(agent, model_name=MODEL, max_queue=2))
    try:
        yield f"http://{handle.host}:{handle.port}"
    finally:
        handle.stop()


def test_api_base_normalizes() -> None:
    assert api_base("127.0.0.1:8000") == "http://127.0.0.1:8000/v1"
    assert api_base("http://h:1/v1/") == "http://h:1/v1"


@pytest.mark.parametrize("chat", [True, False], ids=["chat", "completion"])
def test_generate_via_api_stream_equals_non_stream(url, chat) -> None:
    kw = dict(chat=chat, max_tokens=12, temperature=0.0)
    full = generate_via_api(url, "The edge device runs", **kw)
    assert full.text and full.usage["completion_tokens"] > 0 and full.spececd["mode"] == "speculative"
    pieces: list[str] = []
    streamed = generate_via_api(url, "The edge device runs", stream=True, on_text=pieces.append, **kw)
    assert streamed.text == "".join(pieces) == full.text
    assert streamed.finish_reason == full.finish_reason
    assert streamed.usage == full.usage


def test_generate_via_api_raises_the_api_error(url) -> None:
    with pytest.raises(ApiClientError) as exc:
        generate_via_api(url, "hi", model="nope")
    assert exc.value.status == 404 and exc.value.code == "model_not_found"
    with pytest.raises(ApiClientError, match="cannot reach"):
        generate_via_api("http://127.0.0.1:9", "hi", model=MODEL, timeout=5)


def _repl(target, lines: list[str], **kw) -> tuple[list[dict], str]:
    feed = iter(lines)

    def read(_prompt: str) -> str:
        try:
            return next(feed)
        except StopIteration:
            raise EOFError from None

    out = io.StringIO()
    history = chat_repl(target, input_fn=read, output=out, max_tokens=8, temperature=0.0, **kw)
    return history, out.getvalue()


def test_repl_over_http_and_in_process_agree_and_keep_history(url, agent) -> None:
    lines = ["Where is Paris?", "/stats", "And Rome?"]
    remote, shown = _repl(url, lines, system="Be brief.")
    local, _ = _repl(agent, lines, system="Be brief.")
    assert [m["role"] for m in remote] == ["system", "user", "assistant", "user", "assistant"]
    assert remote == local  # the second answer saw the first turn in both
    assert remote[2]["content"] in shown and '"rounds"' in shown


def test_repl_reset_and_errors_do_not_end_the_chat(url) -> None:
    history, shown = _repl(url, ["hello", "/reset", "again", "/exit", "never read"], seed=-1)
    assert "[error:" in shown and "seed" in shown  # every turn failed validation ...
    assert history == []  # ... and left no half turn behind
    history, shown = _repl(url, ["hello", "/reset", "again"])
    assert "(conversation forgotten)" in shown
    assert [m["content"] for m in history if m["role"] == "user"] == ["again"]


# ------------------------------------------------------------------ spececd-edge subcommands
def test_cli_generate_and_chat_with_url(url, capsys, monkeypatch) -> None:
    from edge_agent.cli import main

    assert (
        main(["generate", "--url", url, "--raw", "--json", "--max-new-tokens", "6", "The edge device runs"])
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert out["usage"]["completion_tokens"] == 6 and out["stats"]["mode"] == "speculative"
    assert out["text"] == generate_via_api(url, "The edge device runs", chat=False, max_tokens=6).text
    monkeypatch.setattr("sys.stdin", io.StringIO("Where is Paris?\n/exit\n"))
    assert main(["chat", "--url", url, "--max-new-tokens", "4", "--stats"]) == 0
    assert "assistant> " in capsys.readouterr().out
    assert main(["generate", "--url", "http://127.0.0.1:9", "hi"]) == 1
    assert "cannot reach" in capsys.readouterr().err


def test_cli_serve_edge_only_answers_and_stops_on_sigterm(models, tmp_path) -> None:  # noqa: F811
    draft_dir = str(models[0].source)
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "SPECECD_LOG_JSON": "1"}
    cmd = [sys.executable, "-m", "edge_agent.cli", "serve", "--mode", "edge-only", "--draft", draft_dir,
           "--target", "tiny-target", "--listen", f"127.0.0.1:{port}", "--max-new-tokens", "5"]  # fmt: skip
    log = tmp_path / "serve.log"
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                reply = generate_via_api(
                    f"127.0.0.1:{port}", "hello", chat=False, model="tiny-target", timeout=5
                )
                break
            except ApiClientError:
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.2)
        assert reply.usage["completion_tokens"] > 0 and reply.spececd["mode"] == "edge-only"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    assert any(line["msg"] == "session end" and line["mode"] == "edge-only" for line in lines)
