"""``spececd-bench``: every mode side by side on the same prompts and seeds (DESIGN §7).

Modes: ``speculative`` (draft here, verify on a worker over MQTT), ``cloud-only`` (the worker
decodes with the target alone over MQTT), ``edge-only`` (the draft alone), ``inprocess``
(speculative with both models in this process, no network) and ``assisted`` (transformers'
``generate(assistant_model=...)`` on the same pair). Writes ``report.json``, ``report.md`` and PNG
plots into ``--out``. See docs/BENCHMARKS.md for how to read them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from bench.runner import MODES, Prompt

DEFAULT_PROMPTS = Path(__file__).with_name("prompts.json")
DEFAULT_MODES = ",".join(m for m in MODES if m != "speculative-seq")  # the five of the original suite


def _gamma(text: str) -> int | str:
    """A γ of the sweep: an integer, or 'auto' (the edge's adaptive γ controller)."""
    return "auto" if text.strip().lower() == "auto" else int(text)


def _list(kind):
    def parse(text: str) -> list:
        try:
            vals = [kind(x) for x in text.split(",") if x.strip()]
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"{text!r}: give one value or a comma list ({exc})") from exc
        if not vals:
            raise argparse.ArgumentTypeError("give at least one value")
        return vals

    return parse


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="spececd-bench", description=__doc__.splitlines()[0])
    from shared.config import add_version_argument

    add_version_argument(ap)
    ap.add_argument("--num-prompts", type=int, default=10, help="how many prompts of the file (1-10)")
    ap.add_argument("--iterations", type=int, default=1, help="repeats of the whole schedule")
    ap.add_argument(
        "--prompts-file", type=Path, default=DEFAULT_PROMPTS, help="JSON list of {category, prompt}"
    )
    ap.add_argument(
        "--modes",
        type=_list(str),
        default=DEFAULT_MODES.split(","),
        help=f"comma list of {', '.join(MODES)} (default {DEFAULT_MODES})",
    )
    ap.add_argument(
        "--gamma",
        type=_list(_gamma),
        default=[4],
        help="draft tokens per round: one or a comma list; 'auto' = the adaptive controller (e.g. 1,2,3,4,6,auto)",
    )
    ap.add_argument(
        "--temperature", type=_list(float), default=[0.0], help="one or a comma list (0 = greedy)"
    )
    ap.add_argument("--top-k", type=int, default=0, help="0 = off")
    ap.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument(
        "--rtt-ms", type=_list(float), default=[0.0], help="added edge<->broker round trip: one or a list"
    )
    ap.add_argument("--draft", help="draft model (folder, .gguf or hub id); default: the demo pair")
    ap.add_argument("--target", help="target model; default: the demo pair")
    ap.add_argument("--draft-backend", type=_list(str), default=["auto"],
                    help="draft runtime: auto, torch, llama.cpp, or a comma list to compare them side by "
                         "side (e.g. torch,llama.cpp); auto runs a .gguf draft with llama.cpp")  # fmt: skip
    ap.add_argument("--host", help="broker host (default: start our own broker)")
    ap.add_argument("--port", type=int, help="broker port (default: start our own broker)")
    ap.add_argument("--start-broker", action=argparse.BooleanOptionalAction, default=None,
                    help="start our own Mosquitto (broker/mosquitto-dev.conf) on a free port; "
                         "default: yes unless --host/--port are given")  # fmt: skip
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--out", type=Path, default=Path("bench-out"), help="output folder")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of this process (the worker: 1)")
    ap.add_argument("--no-pipeline", action="store_true",
                    help="draft only after each verdict (default: draft the next block during the verify)")  # fmt: skip
    ap.add_argument("--no-pin", action="store_true", help="do not pin edge and worker to separate cores")
    ap.add_argument("--warmup-tokens", type=int, default=4, help="tokens of the untimed warm-up run per mode")
    ap.add_argument("--round-timeout-ms", type=int, default=60_000,
                    help="MQTT round deadline in ms, as spececd-edge's --round-timeout-ms (default 60000)")  # fmt: skip
    ap.add_argument("--round-timeout-s", type=float, default=None, help=argparse.SUPPRESS)  # the old spelling
    ap.add_argument(
        "--worker-timeout-s", type=float, default=600.0, help="how long the worker may take to load"
    )
    ap.add_argument(
        "--worker-args",
        type=shlex.split,
        default=[],
        metavar="'FLAGS'",
        help="extra spececd-worker flags for the networked modes, e.g. '--dtype bfloat16' "
        "(the in-process modes load the target as usual)",
    )
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    from bench.fleet import add_fleet_arguments

    add_fleet_arguments(ap)
    return ap


class UsageError(Exception):
    """Bad command-line input; the message says what to do."""


def resolve_models(args: argparse.Namespace) -> tuple[str, str]:
    """(--draft, --target), defaulting to the fetched demo pair."""
    if args.draft and args.target:
        return args.draft, args.target
    if args.draft or args.target:
        raise UsageError("pass both --draft and --target, or neither (the demo pair)")
    from shared.demo import demo_model_paths

    paths = demo_model_paths()
    if paths is None:
        raise UsageError(
            "the demo model pair is not fetched: run `spececd-models fetch-demo` "
            "(downloads and converts it once), or pass --draft and --target"
        )
    return str(paths[0]), str(paths[1])


def load_prompts(path: Path, n: int, tokenizer) -> list[Prompt]:
    """The first ``n`` prompts of ``path``, tokenized through the chat template."""
    from bench.inprocess import encode_prompt

    try:
        items = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UsageError(f"cannot read the prompts file {path}: {exc}") from exc
    if not isinstance(items, list) or not all(
        isinstance(x, dict) and isinstance(x.get("category"), str) and isinstance(x.get("prompt"), str)
        for x in items
    ):
        raise UsageError(f'{path}: expected a JSON list of {{"category": str, "prompt": str}}')
    if not 1 <= n <= min(10, len(items)):
        raise UsageError(f"--num-prompts must be in 1..{min(10, len(items))} (the file has {len(items)})")
    return [
        Prompt(i, x["category"], x["prompt"], tuple(encode_prompt(tokenizer, x["prompt"])))
        for i, x in enumerate(items[:n])
    ]


def check_args(args: argparse.Namespace) -> None:
    """Reject values that make no sense before anything slow starts."""
    if not 1 <= args.num_prompts <= 10:
        raise UsageError("--num-prompts must be in 1..10")
    if args.iterations < 1:
        raise UsageError("--iterations must be >= 1")
    if args.max_new_tokens < 1:
        raise UsageError("--max-new-tokens must be >= 1")
    if any(g != "auto" and not 1 <= g <= 64 for g in args.gamma):
        raise UsageError("--gamma values must be in 1..64 (or 'auto')")
    if any(t < 0 for t in args.temperature) or any(r < 0 for r in args.rtt_ms):
        raise UsageError("--temperature and --rtt-ms must be >= 0")
    bad = [m for m in args.modes if m not in MODES]
    if bad:
        raise UsageError(f"unknown mode(s) {', '.join(bad)}: choose from {', '.join(MODES)}")
    bad = [b for b in args.draft_backend if b not in ("auto", "torch", "llama.cpp")]
    if bad:
        raise UsageError(f"unknown draft backend(s) {', '.join(bad)}: choose from auto, torch, llama.cpp")
    if "llama.cpp" in args.draft_backend and args.draft and not args.draft.lower().endswith(".gguf"):
        raise UsageError("--draft-backend llama.cpp runs a .gguf draft: pass one with --draft")
    if (args.host is None) != (args.port is None) and args.start_broker is not True:
        raise UsageError("give both --host and --port (or neither: the bench starts its own broker)")
    if args.round_timeout_s is not None:  # the old --round-timeout-s still works
        args.round_timeout_ms = round(args.round_timeout_s * 1e3)
    if args.round_timeout_ms < 1:
        raise UsageError("--round-timeout-ms must be >= 1")
    args.round_timeout_s = args.round_timeout_ms / 1e3  # what the runners read


def placement(no_pin: bool) -> tuple[set[int] | None, set[int] | None, str]:
    """(edge cores, worker cores, description): one core each when there are two or more."""
    cores = sorted(os.sched_getaffinity(0))
    if no_pin or len(cores) < 2:
        why = "--no-pin" if no_pin else "only one core available"
        return None, None, f"not pinned ({why})"
    return (
        {cores[0]},
        {cores[1]},
        f"edge (this process, incl. in-process modes) on core {cores[0]}, worker on core {cores[1]}",
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; returns the exit code."""
    from shared.mqtt import prefer_network_latency

    prefer_network_latency()
    args = build_parser().parse_args(argv)
    try:
        check_args(args)
        draft_spec, target_spec = resolve_models(args)
    except UsageError as exc:
        print(f"spececd-bench: {exc}", file=sys.stderr)
        return 2
    from bench.execute import execute

    # SIGTERM unwinds like Ctrl-C, so the broker, proxies and worker we started are stopped too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.fleet is not None or args.noisy:  # the fleet / noisy-neighbour benchmarks (bench/fleet.py)
        from bench.fleet import main_fleet

        return main_fleet(args, draft_spec, target_spec, placement(args.no_pin), _argv_text(argv))

    try:
        report_dir = execute(
            args, draft_spec, target_spec, placement(args.no_pin), argv_text=_argv_text(argv)
        )
    except UsageError as exc:
        print(f"spececd-bench: {exc}", file=sys.stderr)
        return 2
    print(f"spececd-bench: report in {report_dir / 'report.md'}")
    return 0


def _argv_text(argv: Sequence[str] | None) -> str:
    return "spececd-bench " + shlex.join(list(argv if argv is not None else sys.argv[1:]))


def machine_meta() -> dict:
    """What the numbers ran on."""
    import torch
    import transformers

    return {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_implementation()} {platform.python_version()}",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


if __name__ == "__main__":
    sys.exit(main())
