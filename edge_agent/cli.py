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
from edge_agent.mqtt_link import MqttLink
from edge_agent.results import collect
from edge_agent.speculative import SRC_FALLBACK, GenerateOptions, SessionState
from shared.config import EdgeConfig, add_config_arguments, config_from_args
from shared.errors import BrokerAuthError, BrokerError, SpecECDError
from shared.models import load_model
from shared.mqtt import broker_config_from_settings
from shared.sampling import SamplingParams

log = logging.getLogger("spececd.edge")


def options_from_config(cfg: EdgeConfig) -> GenerateOptions:
    return GenerateOptions(
        mode=cfg.mode,
        gamma=cfg.gamma,
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
    draft = load_model(cfg.draft, device=cfg.model_device, dtype=cfg.dtype)
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
    else:
        s = result.summary()
        acc = "-" if s["acceptance"] is None else f"{s['acceptance']:.2f}"
        print(
            f"\n[{s['new_tokens']} tokens, {s['tokens_per_s']:.1f} tok/s, acceptance {acc}, "
            f"{s['rounds']} rounds, {s['fallback_tokens']} unverified fallback tokens]",
            file=sys.stderr,
        )
    return 0


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
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate a completion for PROMPT")
    gen.add_argument("prompt")
    gen.add_argument("--json", action="store_true", help="print one JSON object: token_ids, text, statistics")
    gen.add_argument("--raw", action="store_true", help="no chat template: the prompt is plain text")
    add_config_arguments(gen, "edge")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(args, "edge")
    except SpecECDError as exc:
        print(f"spececd-edge: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=cfg.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "generate":
            return cmd_generate(args, cfg)
    except SpecECDError as exc:
        print(f"spececd-edge: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
