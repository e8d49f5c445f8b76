"""Non-compute time of a speculative round, measured where compute is negligible.

Tiny random models (``tests/tiny.py``, so run it from the repository root), our own Mosquitto,
a real ``spececd-worker`` subprocess pinned to one core and the edge pinned to the other: what
is left of a round besides draft and verify is encode, broker, network, queue and decode.

    python -m bench.overhead --switch-interval 0.005 --no-pipeline
    python -m bench.overhead --switch-interval 0.0005

The interpreter's GIL switch interval is set in both processes (5 ms is CPython's default; our
entry points use 0.5 ms, see ``shared.mqtt.prefer_network_latency``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from bench.procs import REPO, Procs, one_thread_env


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.overhead", description=__doc__.splitlines()[0])
    ap.add_argument(
        "--switch-interval", type=float, default=0.0005, help="sys.setswitchinterval in both processes"
    )
    ap.add_argument("--no-pipeline", action="store_true", help="sequential drafting")
    ap.add_argument("--generations", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=100)
    args = ap.parse_args(argv)
    sys.setswitchinterval(args.switch_interval)
    sys.path.insert(0, str(REPO))
    from edge_agent.agent import EdgeAgent
    from edge_agent.mqtt_link import MqttLink
    from edge_agent.speculative import GenerateOptions
    from shared.models import load_model
    from shared.mqtt import BrokerConfig
    from shared.sampling import SamplingParams
    from tests.tiny import make_tiny_model_dir
    from tests.workers import wait_status

    root = Path(tempfile.mkdtemp(prefix="spececd-overhead-"))
    draft_dir = make_tiny_model_dir(root / "draft", arch="qwen2", seed=1, layers=1)
    target_dir = make_tiny_model_dir(root / "target", arch="qwen2", seed=2)
    cores = sorted(os.sched_getaffinity(0))
    with Procs(root / "logs") as procs:
        host, port = procs.start_broker()
        code = (
            f"import sys; sys.setswitchinterval({args.switch_interval}); from cloud_worker.cli import main; "
            f"sys.exit(main(['--broker', '{host}:{port}', '--worker-id', 'overhead', '--target', '{target_dir}', "
            "'--draft', 'x']))"
        )
        pin = (lambda: os.sched_setaffinity(0, {cores[-1]})) if len(cores) > 1 else None
        worker = subprocess.Popen([sys.executable, "-c", code], env={**one_thread_env(), "PYTHONPATH": str(REPO)},
                                  preexec_fn=pin, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        try:
            os.sched_setaffinity(0, {cores[0]})
            torch.set_num_threads(1)
            cfg = BrokerConfig(host=host, port=port)
            wait_status(cfg, "overhead", b"online", timeout=120)
            link = MqttLink(cfg, device="overhead", round_timeout_s=5.0)
            link.connect()
            opts = GenerateOptions(gamma=4, max_new_tokens=args.max_new_tokens, pipeline=not args.no_pipeline,
                                   params=SamplingParams(temperature=0.8, seed=1))  # fmt: skip
            agent = EdgeAgent(load_model(str(draft_dir)), link, defaults=opts)
            agent.run([1, 2, 3])  # warm-up
            rounds = [r for i in range(args.generations) for r in agent.run([1, 2, 3 + i]).rounds]
            link.shutdown()
        finally:
            worker.terminate()
            worker.wait(10)
    noncompute = sorted(r.link_ms - r.verify_ms for r in rounds)
    print(
        f"switch interval {args.switch_interval * 1e3:g} ms, pipelined {not args.no_pipeline}: {len(rounds)} rounds; "
        f"non-compute per round median {statistics.median(noncompute):.2f} ms, "
        f"p90 {noncompute[int(0.9 * len(noncompute))]:.2f} ms "
        f"(queue median {statistics.median(r.queue_ms for r in rounds):.2f} ms, "
        f"encode+decode median {statistics.median(r.codec_ms for r in rounds):.2f} ms)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
