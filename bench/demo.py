"""``make demo``: SpecECD end to end on the demo pair, on this machine.

Fetches and verifies the demo pair (cached after the first time), starts our own Mosquitto with
``broker/mosquitto-dev.conf`` on a free port, one worker (``spececd-worker``, pinned to its own
core, torch target), and the edge agent in this process (the draft's quantized GGUF run by
llama.cpp, no fp32 conversion; ``--draft-backend torch`` converts it instead), then streams a
completion with a live status line.
Ctrl-C or the end stops every process it started.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

DEFAULT_PROMPT = "Write a Python function that tells whether a number is prime, and explain it briefly."


class DemoError(Exception):
    """Something the demo needs is missing; the message says what and how to fix it."""


def check_prerequisites() -> None:
    if shutil.which("mosquitto") is None:
        raise DemoError(
            "the `mosquitto` broker binary is not on PATH. Install it: `sudo apt-get install mosquitto` "
            "(Debian/Ubuntu), `brew install mosquitto` (macOS); the demo starts its own instance."
        )


def ensure_models() -> tuple[Path, Path]:
    """(draft GGUF, target folder), fetching them the first time (with progress)."""
    from shared.demo import demo_model_paths, fetch_demo

    paths = demo_model_paths()
    if paths is not None:
        return paths
    print("fetching the demo pair (Qwen2.5-Coder 0.5B draft, 1.5B target) — first run only", file=sys.stderr)
    draft, target = fetch_demo(progress=lambda s: print(f"  {s}", file=sys.stderr, flush=True))
    return draft, target


class StatusLine:
    """Streams text, with one status line kept under it when stderr is a terminal."""

    def __init__(self) -> None:
        self.tty = sys.stdout.isatty() and sys.stderr.isatty()
        self.partial = ""
        self.last_plain = 0.0

    def text(self, chunk: str) -> None:
        if not self.tty:
            sys.stdout.write(chunk)
            sys.stdout.flush()
            return
        *done, self.partial = (self.partial + chunk).split("\n")
        if done:
            sys.stderr.write("\r\033[K")
            sys.stdout.write("\n".join(done) + "\n")
            sys.stdout.flush()

    def status(self, line: str) -> None:
        if self.tty:
            sys.stderr.write(f"\r\033[K{self.partial}\033[2m  ⟨{line}⟩\033[0m")
            sys.stderr.flush()
        elif time.monotonic() - self.last_plain > 5:
            self.last_plain = time.monotonic()
            print(f"\n[{line}]", file=sys.stderr, flush=True)

    def end(self, line: str) -> None:
        if self.tty:
            sys.stderr.write("\r\033[K")
            sys.stdout.write(self.partial)
        print(f"\n\n[{line}]", file=sys.stderr, flush=True)


def run(
    prompt: str, *, max_new_tokens: int, gamma: int, temperature: float, draft_backend: str = "auto"
) -> int:
    import torch

    from bench.procs import Procs
    from edge_agent.agent import EdgeAgent
    from edge_agent.drafter import load_draft
    from edge_agent.mqtt_link import MqttLink
    from edge_agent.speculative import SRC_DRAFT, SRC_FALLBACK, GenerateOptions
    from shared.mqtt import BrokerConfig
    from shared.sampling import SamplingParams

    check_prerequisites()
    draft_dir, target_dir = ensure_models()
    cores = sorted(os.sched_getaffinity(0))
    split = len(cores) >= 2
    with Procs() as procs:
        host, port = procs.start_broker()
        print(f"broker: mosquitto on {host}:{port} (broker/mosquitto-dev.conf)", file=sys.stderr)
        worker, _log = procs.start_worker(
            (host, port), target=str(target_dir), draft_name=str(draft_dir), worker_id="demo-worker",
            cores={cores[-1]} if split else None,
        )  # fmt: skip
        if split:  # edge and cloud must not share a core (DESIGN §7)
            os.sched_setaffinity(0, {cores[0]})
            torch.set_num_threads(1)
        print(f"edge: loading draft model {draft_dir.name}", file=sys.stderr)
        # one thread on the edge's core; the target's tokenizer encodes the prompt
        draft = load_draft(str(draft_dir), backend=draft_backend, threads=1, target=str(target_dir))
        print(f"edge: draft runs on {getattr(draft, 'backend', 'torch')}", file=sys.stderr)
        link = MqttLink(BrokerConfig(host=host, port=port), device="demo-edge", round_timeout_s=30.0)
        link.connect()
        t0 = time.monotonic()
        while not link.available():
            if worker.poll() is not None:
                raise DemoError(f"the worker exited ({worker.returncode}):\n{procs.log_tail('worker')}")
            print(f"\rworker: loading target model {target_dir.name} … {time.monotonic() - t0:.0f} s",
                  end="", file=sys.stderr, flush=True)  # fmt: skip
            time.sleep(0.5)
        print(f"\rworker: online after {time.monotonic() - t0:.0f} s" + " " * 20, file=sys.stderr)
        opts = GenerateOptions(
            gamma=gamma, max_new_tokens=max_new_tokens, params=SamplingParams(temperature=temperature, seed=0),
            draft_model=str(draft_dir), target_model=str(target_dir), on_cloud_unreachable="draft",
        )  # fmt: skip
        agent = EdgeAgent(draft, link, defaults=opts)
        out = StatusLine()
        print(f"\n> {prompt}\n", file=sys.stderr)
        ids: list[int] = []
        shown, rounds, drafted, accepted, fallback = "", 0, 0, 0, 0
        start = time.perf_counter()
        try:
            for ev in agent.stream(agent.encode_prompt(prompt), opts):
                ids.append(ev.token)
                fallback += ev.source == SRC_FALLBACK
                if ev.round is not None and ev.source != SRC_DRAFT:  # the last token of a round
                    rounds += 1
                    drafted += ev.round.judged
                    accepted += ev.round.n_acc
                text = agent.decode(ids)
                if not text.endswith("\ufffd"):
                    out.text(text[len(shown) :])
                    shown = text
                rate = len(ids) / (time.perf_counter() - start)
                acc = f"{accepted / drafted:.2f}" if drafted else "-"
                out.status(f"{rate:.1f} tok/s · acceptance {acc} · {rounds} rounds · {fallback} unverified")
        finally:
            link.shutdown()
        out.end(
            f"{len(ids)} tokens in {time.perf_counter() - start:.1f} s · {rounds} target forwards · "
            f"acceptance {accepted / drafted if drafted else 0:.2f} (accepted / judged draft tokens)"
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    from shared.mqtt import prefer_network_latency

    prefer_network_latency()
    parser = argparse.ArgumentParser(prog="spececd-demo", description=__doc__.splitlines()[0])
    parser.add_argument("prompt", nargs="?", default=DEFAULT_PROMPT)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--gamma", type=int, default=4)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument(
        "--draft-backend", choices=("auto", "torch", "llama.cpp"), default="auto",
        help="the draft's runtime (auto: llama.cpp for the GGUF draft when installed)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    try:
        return run(
            args.prompt, max_new_tokens=args.max_new_tokens, gamma=args.gamma, temperature=args.temperature,
            draft_backend=args.draft_backend,
        )  # fmt: skip
    except KeyboardInterrupt:
        print("\ninterrupted: every process the demo started is stopped", file=sys.stderr)
        return 130
    except DemoError as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:
        from shared.errors import SpecECDError

        if isinstance(exc, SpecECDError):
            print(f"demo: {exc}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
