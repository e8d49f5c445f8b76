"""The HTTP API's request parsing and the generation job (blocking, run in a worker thread).

``parse_request`` turns an OpenAI-style JSON body into a :class:`GenRequest` or raises
:class:`ApiError` with OpenAI's error fields. ``run_job`` runs one generation on the agent and
reports text deltas as they become final: incremental detokenization that holds back an
incomplete UTF-8 character and any tail that could still turn into a stop sequence, so the
streamed pieces always add up to the non-streamed text.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from edge_agent.agent import EdgeAgent
from edge_agent.gamma import GAMMA_AUTO
from edge_agent.results import GenerationResult, collect
from edge_agent.speculative import MODES, GenerateOptions, SessionState
from shared.logs import log_session_end, log_session_start
from shared.sampling import SamplingParams

log = logging.getLogger(__name__)

MAX_STOP = 4  # as OpenAI's API
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")

# The fields each endpoint implements. Anything else is answered 400 naming it, as OpenAI does.
_COMMON = {"model", "stream", "stream_options", "n", "stop", "max_tokens", "temperature", "top_p",
           "top_k", "seed", "spececd", "user", "metadata", "store"}  # fmt: skip
FIELDS = {
    "completion": _COMMON | {"prompt"},
    "chat": _COMMON | {"messages", "max_completion_tokens"},
}
# Options whose neutral value is accepted (it changes nothing); any other value is refused.
NEUTRAL = {
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "echo": (None, False),
    "best_of": (None, 1),
    "frequency_penalty": (None, 0, 0.0),
    "presence_penalty": (None, 0, 0.0),
    "repetition_penalty": (None, 1, 1.0),
    "min_p": (None, 0, 0.0),
    "logit_bias": (None, {}),
    "suffix": (None, ""),
    "tools": (None, []),
    "functions": (None, []),
    "tool_choice": (None, "none"),
    "function_call": (None, "none"),
    "parallel_tool_calls": (None, False, True),
    "response_format": (None, {"type": "text"}),
    "service_tier": (None, "auto", "default"),
    # OpenAI's, not implemented here: only an explicit null is accepted
    "modalities": (None, ["text"]),
    "audio": (None,),
    "prediction": (None,),
    "reasoning_effort": (None,),
    "web_search_options": (None,),
}
SPECECD_FIELDS = ("mode", "gamma")


class ApiError(Exception):
    """An error answered in OpenAI's shape: ``{"error": {message, type, param, code}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class GenRequest:
    """One validated request: the prompt's token ids and the generation options."""

    kind: str  # "completion" or "chat"
    prompt_ids: list[int]
    opts: GenerateOptions
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool = False
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    created: int = field(default_factory=lambda: int(time.time()))


@dataclass
class Outcome:
    """What a finished job hands back to the HTTP side."""

    text: str
    finish_reason: str  # "stop" or "length"
    result: GenerationResult
    prompt_tokens: int
    mode: str
    sid: str

    def usage(self) -> dict:
        n = len(self.result.token_ids)
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": n,
            "total_tokens": self.prompt_tokens + n,
        }

    def extension(self) -> dict:
        """The ``spececd`` field: SpecECD's own figures of this generation."""
        return {"mode": self.mode, "session": self.sid, **self.result.summary()}


# ------------------------------------------------------------------ parsing
def _bad(message: str, param: str | None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def _number(body: dict, name: str, lo: float, hi: float) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _bad(f"'{name}' must be a number, got {value!r}", name)
    if not lo <= value <= hi:
        raise _bad(f"'{name}' must be between {lo} and {hi}, got {value}", name)
    return float(value)


def _int(body: dict, name: str, lo: int, hi: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(f"'{name}' must be an integer, got {value!r}", name)
    if not lo <= value <= hi:
        raise _bad(f"'{name}' must be between {lo} and {hi}, got {value}", name)
    return value


def _stop(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    items = [stop] if isinstance(stop, str) else stop
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise _bad("'stop' must be a string or a list of strings", "stop")
    if len(items) > MAX_STOP:
        raise _bad(f"'stop' takes at most {MAX_STOP} sequences, got {len(items)}", "stop")
    return tuple(s for s in items if s)


def _prompt_ids(agent: EdgeAgent, body: dict, kind: str) -> list[int]:
    if kind == "chat":
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise _bad("'messages' is required: a non-empty list of {role, content} objects", "messages")
        return encode_messages(agent, [_message(m, i) for i, m in enumerate(messages)])
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        ids = agent.encode_prompt(prompt, chat=False) if prompt else []
        if not ids:
            raise _bad("'prompt' is empty: give some text to complete", "prompt")
        return ids
    if (
        isinstance(prompt, list)
        and prompt
        and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)
    ):
        vocab = agent.draft.vocab_size
        if not all(0 <= t < vocab for t in prompt):
            raise _bad(f"token ids in 'prompt' must be in 0..{vocab - 1}", "prompt")
        return list(prompt)
    if prompt is None:
        raise _bad("'prompt' is required: a string (or a list of token ids)", "prompt")
    raise _bad("'prompt' must be one string or one list of token ids (batches are not supported)", "prompt")


def _message(m: object, i: int) -> dict:
    param = f"messages[{i}]"
    if not isinstance(m, dict) or m.get("role") not in CHAT_ROLES:
        raise _bad(f"{param} must be an object with 'role' one of {', '.join(CHAT_ROLES)}", param)
    content = m.get("content")
    if isinstance(content, list):  # content parts: keep the text ones
        parts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
        if len(parts) != len(content) or not all(isinstance(t, str) for t in parts):
            raise _bad(f"{param}.content: only text parts are supported", f"{param}.content")
        content = "".join(parts)
    if content is None and m["role"] == "assistant":
        content = ""
    if not isinstance(content, str):
        raise _bad(f"{param}.content must be a string (or a list of text parts)", f"{param}.content")
    role = "system" if m["role"] == "developer" else m["role"]
    return {"role": role, "content": content}


def encode_messages(agent: EdgeAgent, messages: list[dict]) -> list[int]:
    """Token ids of a chat through the tokenizer's chat template; a plain ``role: content``
    layout when the tokenizer has no template (base models)."""
    if getattr(agent.tokenizer, "chat_template", None):
        return agent.encode_chat(messages)
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
    return agent.encode_prompt(text, chat=False)


def check_fields(body: dict, kind: str) -> None:
    """Refuse what this API does not implement, naming the field (never ignore an option)."""
    for name, value in body.items():
        if name in FIELDS[kind]:
            continue
        if name in NEUTRAL:
            if any(
                value is None if ok is None else type(value) is type(ok) and value == ok
                for ok in NEUTRAL[name]
            ):
                continue
            raise _bad(
                f"'{name}' is not supported by this API (SpecECD implements: {', '.join(sorted(FIELDS[kind]))}); "
                f"remove it or send {json.dumps(NEUTRAL[name][-1])}",
                name,
                "unsupported_parameter",
            )
        raise _bad(f"Unrecognized request argument supplied: {name}", name, "unknown_parameter")
    ext = body.get("spececd")
    if isinstance(ext, dict):
        for name in ext:
            if name not in SPECECD_FIELDS:
                raise _bad(
                    f"Unrecognized argument 'spececd.{name}': the spececd object takes {', '.join(SPECECD_FIELDS)}",
                    f"spececd.{name}",
                    "unknown_parameter",
                )
    so = body.get("stream_options")
    if so is not None:
        if body.get("stream") is not True:
            raise _bad("'stream_options' is only allowed when 'stream' is true", "stream_options")
        if (
            not isinstance(so, dict)
            or set(so) - {"include_usage"}
            or not isinstance(so.get("include_usage", False), bool)
        ):
            raise _bad("'stream_options' must be {\"include_usage\": true or false}", "stream_options")


def parse_request(agent: EdgeAgent, body: object, kind: str, *, context: int | None) -> GenRequest:
    """Validate an OpenAI-style body (``kind`` "completion" or "chat") into a :class:`GenRequest`.

    Blocking (it tokenizes): the API runs it off the event loop."""
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object", None)
    check_fields(body, kind)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise _bad("'stream' must be true or false", "stream")
    if body.get("n", 1) != 1:
        raise _bad("only n = 1 is supported", "n")
    stop = _stop(body)
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _int(body, name, 1, 1 << 30)
    d = agent.defaults
    temperature = _number(body, "temperature", 0.0, 2.0)
    top_p = _number(body, "top_p", 0.0, 1.0)
    if top_p == 0.0:
        raise _bad("'top_p' must be greater than 0", "top_p")
    seed = _int(body, "seed", 0, 2**63 - 1)
    top_k = _int(body, "top_k", 0, 1 << 30)
    ext = body.get("spececd") or {}
    if not isinstance(ext, dict):
        raise _bad('\'spececd\' must be an object like {"mode": "speculative", "gamma": 4}', "spececd")
    mode = ext.get("mode", d.mode)
    if mode not in MODES:
        raise _bad(f"'spececd.mode' must be one of {', '.join(MODES)}", "spececd.mode")
    gamma = GAMMA_AUTO if ext.get("gamma") == GAMMA_AUTO else (_int(ext, "gamma", 1, 64) or d.gamma)
    prompt_ids = _prompt_ids(agent, body, kind)
    if context is not None and len(prompt_ids) >= context:
        raise _bad(
            f"the prompt is {len(prompt_ids)} tokens; this model's context is {context} tokens: shorten it",
            "messages" if kind == "chat" else "prompt",
            "context_length_exceeded",
        )
    budget = max_tokens or d.max_new_tokens
    if context is not None:
        budget = min(budget, context - len(prompt_ids))  # the rest of the context, at most
    params = SamplingParams(
        temperature=d.params.temperature if temperature is None else temperature,
        top_k=d.params.top_k if top_k is None else top_k,
        top_p=d.params.top_p if top_p is None else top_p,
        seed=d.params.seed if seed is None else seed,
    )
    opts = agent.options(mode=mode, gamma=gamma, max_new_tokens=budget, params=params)
    so = body.get("stream_options") or {}
    include_usage = bool(isinstance(so, dict) and so.get("include_usage"))
    return GenRequest(kind, prompt_ids, opts, stop, stream, include_usage)


# ------------------------------------------------------------------ the job
class TextAssembler:
    """Decodes the growing token list and yields only text that can no longer change."""

    def __init__(self, decode: Callable[[list[int]], str], stop: tuple[str, ...]) -> None:
        self.decode, self.stop = decode, stop
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.tokens: list[int] = []
        self.sent = ""
        self.stopped = False  # a stop sequence was found
        self.text = ""

    def add(self, token: int) -> str:
        """Take one token; return the new final text (may be empty)."""
        self.tokens.append(token)
        text = self.decode(self.tokens)
        for s in self.stop:
            cut = text.find(s, max(0, len(self.sent) - len(s)))
            if cut >= 0:
                text, self.stopped = text[:cut], True
        self.text = text
        if self.stopped:
            return self.flush()
        safe = text[: len(text) - self.hold] if self.hold else text
        while safe.endswith("\ufffd"):  # an incomplete UTF-8 character: wait for its other bytes
            safe = safe[:-1]
        return self._emit(safe)

    def flush(self) -> str:
        """All text not yet sent (at the end of the generation)."""
        return self._emit(self.text)

    def _emit(self, upto: str) -> str:
        if len(upto) <= len(self.sent) or not upto.startswith(self.sent):
            return ""
        delta, self.sent = upto[len(self.sent) :], upto
        return delta


def run_job(
    agent: EdgeAgent,
    req: GenRequest,
    on_text: Callable[[str], None],
    cancel: threading.Event,
) -> Outcome:
    """One generation (blocking): calls ``on_text`` with each final piece of text, stops early on
    a stop sequence or ``cancel``, tells the agent's result observers, logs the session."""
    state = SessionState()
    log_session_start(state.sid, req.opts, len(req.prompt_ids))
    asm = TextAssembler(agent.decode, req.stop)
    events = agent.stream(req.prompt_ids, req.opts, state=state)

    def tee():
        try:
            for ev in events:
                yield ev
                delta = asm.add(ev.token)
                if delta:
                    on_text(delta)
                if asm.stopped or cancel.is_set():
                    return
        finally:
            events.close()  # closes the session on the worker

    result = collect(tee(), state=state)
    rest = asm.flush()
    if rest:
        on_text(rest)
    result.text = asm.text
    for obs in agent.result_observers:
        obs(result, req.opts)
    log_session_end(result, req.opts, state.sid)
    ended_on_eos = bool(result.token_ids) and result.token_ids[-1] in agent.eos_ids
    finish = "stop" if asm.stopped or ended_on_eos else "length"
    if cancel.is_set() and not asm.stopped:
        finish = "cancelled"
    return Outcome(asm.text, finish, result, len(req.prompt_ids), req.opts.mode, state.sid)
