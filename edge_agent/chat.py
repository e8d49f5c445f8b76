"""Client helpers for a running agent's API, and a chat REPL (``spececd-edge chat``).

Only the standard library talks HTTP here, so the edge needs no extra client package.
``generate_via_api`` sends one completion or chat request (streamed or not); ``chat_repl`` keeps
a conversation, either with a running agent (a URL) or with an ``EdgeAgent`` in this process.
"""

from __future__ import annotations

import json
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TextIO

from edge_agent.agent import EdgeAgent

__all__ = ["ApiClientError", "ApiReply", "api_base", "chat_repl", "generate_via_api", "served_model"]

REPL_HELP = "Commands: /reset (forget the conversation), /stats (figures of the last reply), /exit."


class ApiClientError(RuntimeError):
    """The API answered an error (``status``, OpenAI ``code``) or could not be reached."""

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code = status, code


@dataclass
class ApiReply:
    """One answer: its text, why it ended, token counts and SpecECD's figures."""

    text: str
    finish_reason: str | None
    usage: dict = field(default_factory=dict)
    spececd: dict = field(default_factory=dict)


def api_base(url: str) -> str:
    """``http://host:port`` or ``.../v1`` (with or without a trailing slash) -> ``.../v1``."""
    url = url.rstrip("/")
    if not url.startswith(("http://", "https://")):
        url = "http://" + url
    return url if url.endswith("/v1") else url + "/v1"


def _request(url: str, body: dict | None, timeout: float):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        return urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as exc:
        try:
            err = json.loads(exc.read())["error"]
            raise ApiClientError(err["message"], status=exc.code, code=err.get("code")) from None
        except (ValueError, KeyError, TypeError):
            raise ApiClientError(f"HTTP {exc.code} from {url}", status=exc.code) from None
    except urllib.error.URLError as exc:
        raise ApiClientError(
            f"cannot reach the agent at {url}: {exc.reason} (is `spececd-edge serve` running?)"
        ) from exc


def served_model(url: str, *, timeout: float = 10.0) -> str:
    """The first model name the agent at ``url`` serves (``GET /v1/models``)."""
    with _request(api_base(url) + "/models", None, timeout) as resp:
        data = json.loads(resp.read())["data"]
    if not data:
        raise ApiClientError(f"the agent at {url} serves no model")
    return data[0]["id"]


def _sse(resp) -> Iterator[dict]:
    for raw in resp:
        line = raw.decode("utf-8").strip()
        if not line.startswith("data:"):
            continue
        payload = line[5:].strip()
        if payload == "[DONE]":
            return
        obj = json.loads(payload)
        if "error" in obj:
            err = obj["error"]
            raise ApiClientError(err.get("message", "error"), code=err.get("code"))
        yield obj


def generate_via_api(
    url: str,
    prompt: str | list[dict],
    *,
    model: str | None = None,
    chat: bool = True,
    stream: bool = False,
    on_text: Callable[[str], None] | None = None,
    max_tokens: int | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    stop: str | list[str] | None = None,
    mode: str | None = None,
    timeout: float = 600.0,
) -> ApiReply:
    """One request to the agent at ``url``; ``prompt`` is text or a list of chat messages.

    ``chat`` uses ``/v1/chat/completions`` (the chat template) else ``/v1/completions`` (raw
    text). With ``stream`` each piece of text is passed to ``on_text`` as it arrives. ``model``
    defaults to the one the agent serves; ``mode`` asks for a generation mode (``spececd.mode``).
    Raises ``ApiClientError`` for an error answer or an unreachable agent.
    """
    base = api_base(url)
    body: dict[str, Any] = {"model": model or served_model(base, timeout=timeout), "stream": stream}
    if isinstance(prompt, list):
        if not chat:
            raise ValueError("a list of messages needs chat=True")
        body["messages"] = prompt
    elif chat:
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    optional = {
        "max_tokens": max_tokens,
        "temperature": temperature,
        "top_p": top_p,
        "seed": seed,
        "stop": stop,
    }
    body.update({k: v for k, v in optional.items() if v is not None})
    if mode is not None:
        body["spececd"] = {"mode": mode}
    if stream:
        body["stream_options"] = {"include_usage": True}  # usage comes only when asked for
    path = "/chat/completions" if chat else "/completions"
    with _request(base + path, body, timeout) as resp:
        if not stream:
            data = json.loads(resp.read())
            choice = data["choices"][0]
            text = choice["message"]["content"] if chat else choice["text"]
            return ApiReply(text, choice.get("finish_reason"), data.get("usage", {}), data.get("spececd", {}))
        reply = ApiReply("", None)
        for chunk in _sse(resp):
            for choice in chunk.get("choices", []):
                piece = (choice.get("delta", {}).get("content") if chat else choice.get("text")) or ""
                if piece:
                    reply.text += piece
                    if on_text is not None:
                        on_text(piece)
                reply.finish_reason = choice.get("finish_reason") or reply.finish_reason
            reply.usage = chunk.get("usage") or reply.usage
            reply.spececd = chunk.get("spececd") or reply.spececd
        return reply


def _reply_in_process(
    agent: EdgeAgent, messages: list[dict], on_text: Callable[[str], None], **params
) -> ApiReply:
    """One chat turn on an in-process agent, streamed through the API's own job code."""
    from edge_agent.api_text import parse_request, run_job

    context = agent.context_length
    req = parse_request(agent, {"messages": messages, **params}, "chat", context=context)
    out = run_job(agent, req, on_text, threading.Event())
    return ApiReply(out.text, out.finish_reason, out.usage(), out.extension())


def chat_repl(
    target: str | EdgeAgent,
    *,
    model: str | None = None,
    system: str | None = None,
    input_fn: Callable[[str], str] = input,
    output: TextIO | None = None,
    show_stats: bool = False,
    **params: Any,
) -> list[dict]:
    """A chat loop: read a line, stream the answer, keep the history; returns the history.

    ``target`` is the URL of a running agent (``http://127.0.0.1:8000``) or an ``EdgeAgent``
    here. ``params`` are request fields (``max_tokens``, ``temperature``, ``seed``, ...). Ends
    on ``/exit``, end of input or Ctrl-C. Errors of one turn are printed and the loop goes on.
    """
    out = output or sys.stdout
    history: list[dict] = [{"role": "system", "content": system}] if system else []
    last: ApiReply | None = None

    def write(text: str) -> None:
        out.write(text)
        out.flush()

    if isinstance(target, str) and model is None:
        model = served_model(target)
    write(f"{REPL_HELP}\n")
    while True:
        try:
            line = input_fn("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            write("\n")
            return history
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return history
        if line == "/reset":
            history = history[:1] if system else []
            write("(conversation forgotten)\n")
            continue
        if line == "/stats":
            write(json.dumps(last.spececd if last else {}, indent=2) + "\n")
            continue
        history.append({"role": "user", "content": line})
        write("assistant> ")
        try:
            if isinstance(target, str):
                last = generate_via_api(target, history, model=model, stream=True, on_text=write, **params)
            else:
                last = _reply_in_process(target, history, write, **params)
        except Exception as exc:  # one failed turn (API error, bad parameter) must not end the chat
            history.pop()
            write(f"\n[error: {exc}]\n")
            continue
        write("\n")
        history.append({"role": "assistant", "content": last.text})
        if show_stats and last.spececd:
            s = last.spececd
            acc = s.get("acceptance")
            write(
                f"[{s.get('new_tokens')} tokens, {s.get('rounds')} rounds, acceptance {acc if acc is None else round(acc, 2)}]\n"
            )
