"""``spececd-edge``: the edge agent's command line.

``generate PROMPT`` runs one generation (speculative, cloud-only or edge-only) and streams the
text, or prints one JSON object with ``--json``. ``serve`` starts the local HTTP API, ``chat`` a
small REPL.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable

from edge_agent.agent import EdgeAgent
from edge_agent.chat import ApiClientError
from edge_agent.drafter import load_draft
from edge_agent.mqtt_link import MqttLink
from edge_agent.results import collect
from edge_agent.speculative import SRC_FALLBACK, GenerateOptions, SessionState
from shared.config import (
    EdgeConfig,
    add_config_arguments,
    add_version_argument,
    apply_environment,
    config_from_args,
)
from shared.errors import BrokerAuthError, BrokerError, SpecECDError
from shared.logs import register_secrets_of, setup_logging
from shared.mqtt import broker_config_from_settings, prefer_network_latency
from shared.sampling import SamplingParams

log = logging.getLogger("spececd.edge")


def options_from_config(cfg: EdgeConfig) -> GenerateOptions:
    return GenerateOptions(
        mode=cfg.mode,
        gamma=cfg.gamma,
        pipeline=cfg.pipeline,
        max_new_tokens=cfg.max_new_tokens,
        params=SamplingParams(temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p, seed=cfg.seed),
        on_cloud_unreachable=cfg.on_cloud_unreachable,
        draft_model=cfg.draft,
        target_model=cfg.target,
    )


def connect_link(cfg: EdgeConfig) -> MqttLink:
    """Connect to the broker. Wrong credentials always fail; an unreachable broker fails only
    under the ``fail`` policy, else the link keeps trying in the background."""
    link = MqttLink(
        broker_config_from_settings(cfg.broker), device=cfg.device, round_timeout_s=cfg.round_timeout_ms / 1e3
    )
    try:
        link.connect()
    except BrokerAuthError:
        raise
    except BrokerError as exc:
        if cfg.on_cloud_unreachable == "fail":
            raise
        link.connect_in_background(first_error=exc)
    return link


def build_agent(cfg: EdgeConfig, *, status: Callable[[str], None] = lambda _s: None) -> EdgeAgent:
    """Load the draft model and connect to the broker (not needed in edge-only mode)."""
    status(f"loading draft model {cfg.draft}")
    draft = load_draft(
        cfg.draft, backend=cfg.draft_backend, threads=cfg.draft_threads, target=cfg.target,
        device=cfg.model_device, dtype=cfg.dtype, offline=not cfg.allow_download,
    )  # fmt: skip
    link = None
    if cfg.mode != "edge-only":
        status(f"connecting to the broker at {cfg.broker.address}")
        link = connect_link(cfg)
    return EdgeAgent(draft, link, defaults=options_from_config(cfg))


def cmd_generate(args: argparse.Namespace, cfg: EdgeConfig) -> int:
    agent = build_agent(cfg, status=lambda s: log.info("%s", s))
    try:
        prompt_ids = agent.encode_prompt(args.prompt, chat=not args.raw)
        opts = agent.defaults
        state = SessionState()
        events = agent.stream(prompt_ids, opts, state=state)
        if not args.json:
            events = _echo(agent, events)
        result = collect(events, state=state)
        result.text = agent.decode(result.token_ids)
    finally:
        agent.close()
    if args.json:
        out = {
            "token_ids": result.token_ids,
            "text": result.text,
            "sources": result.sources,
            "fallback_positions": [i for i, s in enumerate(result.sources) if s == SRC_FALLBACK],
            "mode": opts.mode,
            "stats": result.summary(),
            "rounds": result.rounds_as_dicts(),
        }
        print(json.dumps(out))
    elif cfg.log_json:  # stderr carries only JSON lines
        log.info("generation done", extra=result.summary())
    else:
        s = result.summary()
        acc = "-" if s["acceptance"] is None else f"{s['acceptance']:.2f}"
        print(
            f"\n[{s['new_tokens']} tokens, {s['tokens_per_s']:.1f} tok/s, acceptance {acc}, "
            f"{s['rounds']} rounds, {s['fallback_tokens']} unverified fallback tokens]",
            file=sys.stderr,
        )
    return 0


def cmd_serve(args: argparse.Namespace, cfg: EdgeConfig) -> int:
    """The local OpenAI-compatible API on ``listen`` until SIGTERM; READY=1 once it listens."""
    from edge_agent.api import serve
    from edge_agent.service import ServiceNotifier

    notifier = ServiceNotifier(watchdog=cfg.watchdog)
    notifier.status(f"loading draft model {cfg.draft}")
    agent = build_agent(cfg, status=notifier.status)
    name = cfg.model_name
    host, port = cfg.listen.host, cfg.listen.port
    try:
        serve(
            agent, host, port, model_name=name, aliases=sorted({cfg.target, "spececd"} - {name}),
            max_queue=cfg.max_queue, max_concurrent=cfg.max_concurrent, log_level=cfg.log_level,
            max_body_bytes=cfg.max_body_bytes,
            on_ready=lambda: notifier.ready(status=f"serving {name} on http://{host}:{port}/v1"),
            heartbeat=notifier.heartbeat, heartbeat_interval=notifier.heartbeat_interval,
        )  # fmt: skip
    finally:
        notifier.stopping("stopping")
        agent.close()
    return 0


def cmd_chat(args: argparse.Namespace, cfg: EdgeConfig | None) -> int:
    """A chat REPL with a running agent (``--url``) or with an agent loaded here."""
    from edge_agent.chat import chat_repl

    params = _request_params(args)
    if args.url:
        chat_repl(args.url, system=args.system, show_stats=args.stats, **params)
        return 0
    assert cfg is not None
    agent = build_agent(cfg, status=lambda s: log.info("%s", s))
    try:
        chat_repl(agent, system=args.system, show_stats=args.stats, **params)
    finally:
        agent.close()
    return 0


def cmd_generate_via_api(args: argparse.Namespace) -> int:
    """``generate --url``: one request to a running agent, streamed unless ``--json``."""
    from edge_agent.chat import generate_via_api

    reply = generate_via_api(
        args.url, args.prompt, chat=not args.raw, stream=not args.json,
        on_text=lambda t: (sys.stdout.write(t), sys.stdout.flush()), **_request_params(args),
    )  # fmt: skip
    if args.json:
        print(json.dumps({"text": reply.text, "finish_reason": reply.finish_reason, "usage": reply.usage,
                          "stats": reply.spececd}))  # fmt: skip
    else:
        sys.stdout.write("\n")
    return 0


def _request_params(args: argparse.Namespace) -> dict:
    """API request fields from the flags given on the command line (``--url`` mode)."""
    out: dict = {}
    for flag, key, conv in (("max_new_tokens", "max_tokens", int), ("temperature", "temperature", float),
                            ("top_p", "top_p", float), ("seed", "seed", int)):  # fmt: skip
        raw = getattr(args, flag, None)
        if raw is not None:
            try:
                out[key] = conv(raw)
            except ValueError:
                raise SystemExit(
                    f"spececd-edge: --{flag.replace('_', '-')} must be a number, got {raw!r}"
                ) from None
    if getattr(args, "mode", None):
        out["mode"] = args.mode
    return out


def _echo(agent: EdgeAgent, events):
    """Print text as tokens arrive (decoding the growing sequence keeps multi-byte characters whole)."""
    ids: list[int] = []
    shown = ""
    for ev in events:
        ids.append(ev.token)
        text = agent.decode(ids)
        if not text.endswith("\ufffd"):
            sys.stdout.write(text[len(shown) :])
            sys.stdout.flush()
            shown = text
        yield ev
    sys.stdout.write("\n")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spececd-edge", description="SpecECD edge agent")
    add_version_argument(parser)
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate a completion for PROMPT")
    gen.add_argument("prompt")
    gen.add_argument("--json", action="store_true", help="print one JSON object: token_ids, text, statistics")
    gen.add_argument("--raw", action="store_true", help="no chat template: the prompt is plain text")
    gen.add_argument(
        "--url", help="ask a running agent's API (e.g. http://127.0.0.1:8000) instead of loading one"
    )
    add_config_arguments(gen, "edge")
    srv = sub.add_parser("serve", help="serve the OpenAI-compatible HTTP API on --listen")
    add_config_arguments(srv, "edge")
    chat = sub.add_parser("chat", help="chat in the terminal (history kept; /reset, /stats, /exit)")
    chat.add_argument("--url", help="chat with a running agent's API instead of loading one here")
    chat.add_argument("--system", help="a system prompt")
    chat.add_argument("--stats", action="store_true", help="print SpecECD's figures after each answer")
    add_config_arguments(chat, "edge")
    return parser


def main(argv: list[str] | None = None) -> int:
    prefer_network_latency()
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "url", None):  # a client of a running agent: no local config needed
        setup_logging("WARNING")
        try:
            return cmd_generate_via_api(args) if args.command == "generate" else cmd_chat(args, None)
        except ApiClientError as exc:
            print(f"spececd-edge: {exc}", file=sys.stderr)
            return 1
    try:
        cfg = config_from_args(args, "edge")
    except SpecECDError as exc:
        print(f"spececd-edge: {exc}", file=sys.stderr)
        return 2
    register_secrets_of(cfg)
    setup_logging(cfg.log_level, json=cfg.log_json)
    apply_environment(cfg)
    try:
        if args.command == "generate":
            return cmd_generate(args, cfg)
        if args.command == "serve":
            return cmd_serve(args, cfg)
        if args.command == "chat":
            return cmd_chat(args, cfg)
    except SpecECDError as exc:
        print(f"spececd-edge: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
