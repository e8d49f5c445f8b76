"""``shared.logs``: JSON lines that parse, levels, and secrets that never reach the output."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from edge_agent.results import GenerationResult
from edge_agent.speculative import SRC_DRAFT, SRC_TARGET, GenerateOptions, RoundStats
from shared.config import load_edge_config
from shared.config_keys import MASK
from shared.logs import log_session_end, log_session_start, register_secrets_of, setup_logging

PASSWORD = "pw-Zebra-4417-quartz"
HF_TOKEN = "hf_SECRETxyz987654321"


@pytest.fixture
def capture() -> Iterator:
    """``capture(json=True, level=...)`` -> a StringIO receiving the root logger's lines."""
    handlers: list[logging.Handler] = []
    root = logging.getLogger()
    old_level = root.level

    def make(json: bool = True, level: str = "DEBUG") -> io.StringIO:
        buf = io.StringIO()
        handlers.append(setup_logging(level, json=json, stream=buf))
        return buf

    yield make
    for h in handlers:
        root.removeHandler(h)
    root.setLevel(old_level)


def lines(buf: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in buf.getvalue().splitlines()]


def test_json_lines_parse_with_fields_and_extras(capture) -> None:
    buf = capture(json=True)
    log = logging.getLogger("spececd.test")
    log.info("hello %s", "world", extra={"sid": "abc", "gamma": 4})
    log.debug("quiet one")
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("it failed")
    first, second, third = lines(buf)
    assert {"ts", "level", "logger", "msg"} <= set(first)
    assert (first["level"], first["logger"], first["msg"]) == ("INFO", "spececd.test", "hello world")
    assert (first["sid"], first["gamma"]) == ("abc", 4)
    assert first["ts"].endswith("+00:00")
    assert second["level"] == "DEBUG"
    assert third["level"] == "ERROR" and "ValueError: boom" in third["exc"]


def test_level_filters_and_setup_replaces_its_handler(capture) -> None:
    capture(json=True)
    buf = capture(json=False, level="WARNING")  # replaces the first handler
    logging.getLogger("spececd.test").info("dropped")
    logging.getLogger("spececd.test").warning("kept", extra={"n": 2})
    out = buf.getvalue().splitlines()
    assert len(out) == 1 and "WARNING spececd.test: kept n=2" in out[0]
    assert sum(getattr(h, "_spececd", False) for h in logging.getLogger().handlers) == 1
    with pytest.raises(ValueError, match="log level"):
        setup_logging("LOUD")


@pytest.mark.parametrize("as_json", [True, False], ids=["json", "text"])
def test_config_secrets_never_appear_in_output(capture, as_json, tmp_path) -> None:
    buf = capture(json=as_json)
    env = {"SPECECD_PASSWORD": PASSWORD, "SPECECD_HF_TOKEN": HF_TOKEN, "SPECECD_USERNAME": "devA"}
    cfg = load_edge_config(env=env)
    assert cfg.broker.password.reveal() == PASSWORD  # the config really holds it
    assert register_secrets_of(cfg) == 2
    log = logging.getLogger("spececd.test")
    log.info("config %r", cfg)
    log.info("broker %s", cfg.broker, extra={"password": cfg.broker.password.reveal()})
    log.warning("connect failed for devA with password=%s", PASSWORD)
    log.info("hub", extra={"hf_token": HF_TOKEN, "headers": {"Authorization": f"Bearer {HF_TOKEN}"}})
    log.info("raw value leaked by a library: %s and %s", PASSWORD, HF_TOKEN)
    try:
        raise RuntimeError(f"auth failed: {PASSWORD}")
    except RuntimeError:
        log.exception("login")
    out = buf.getvalue()
    assert PASSWORD not in out and HF_TOKEN not in out and "Zebra" not in out
    assert out.count(MASK) >= 7
    assert "devA" in out  # masking is not blanket redaction


def test_innocent_fields_with_token_in_the_name_are_kept(capture) -> None:
    buf = capture(json=True)
    logging.getLogger("x").info(
        "max_new_tokens=64 prompt_tokens=5", extra={"prompt_tokens": 5, "new_tokens": "12"}
    )
    (line,) = lines(buf)
    assert line["msg"] == "max_new_tokens=64 prompt_tokens=5" and line["new_tokens"] == "12"


def test_session_start_and_end_lines_carry_the_figures(capture) -> None:
    buf = capture(json=True)
    opts = GenerateOptions(gamma=3, max_new_tokens=8)
    stats = RoundStats(1, 3, 2, (0.9, 0.8, 0.1), 1.0, 5.0, 2.0, 0.5, 0.1, 100, 20)
    result = GenerationResult(token_ids=[5, 6, 7], sources=[SRC_DRAFT, SRC_DRAFT, SRC_TARGET], rounds=[stats])
    result.total_ms = 12.0
    log_session_start("sid-1", opts, 10)
    log_session_end(result, opts, "sid-1")
    start, end = lines(buf)
    assert start["msg"] == "session start" and start["prompt_tokens"] == 10 and start["sid"] == "sid-1"
    assert end["msg"] == "session end" and end["sid"] == "sid-1" and end["mode"] == "speculative"
    assert (end["new_tokens"], end["rounds"], end["drafted"], end["accepted"]) == (3, 1, 3, 2)
    assert end["acceptance"] == round(2 / 3, 4) and end["fallback_tokens"] == 0
