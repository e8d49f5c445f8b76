"""Operations (issue 11 item 12): metrics without `_created` series, build info, broker
connection and evictions; the Grafana dashboard and the alert rules (checked with promtool);
JSON logs without ANSI copies or progress bars between the lines; the tap's timeout message."""

from __future__ import annotations

import io
import json
import logging
import queue
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from shared.logs import setup_logging
from shared.metrics import EdgeMetrics, WorkerMetrics

ROOT = Path(__file__).resolve().parent.parent
PROM = ROOT / "deploy" / "prometheus"


def promtool() -> str:
    path = shutil.which("promtool")
    assert path, "promtool is missing: install Debian's prometheus package (.ci/run does)"
    return path


def samples(text: bytes) -> dict[tuple[str, tuple], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text.decode())
        for s in fam.samples
    }


# ------------------------------------------------------------------ metrics
def test_no_created_series_and_a_build_info() -> None:
    for m in (WorkerMetrics(), EdgeMetrics()):
        text = m.render().decode()
        assert "_created" not in text
        info = [line for line in text.splitlines() if re.match(r"spececd_\w+_build_info\{", line)]
        assert len(info) == 1 and 'version="' in info[0] and info[0].endswith(" 1.0")


def test_broker_connected_follows_the_connection(dev_broker, uid) -> None:
    from edge_agent.mqtt_link import MqttLink

    link = MqttLink(dev_broker.config(), device=uid, round_timeout_s=5.0)
    metrics = EdgeMetrics()

    class Agent:  # what attach() reads of an EdgeAgent
        def __init__(self) -> None:
            self.round_observers: list = []
            self.result_observers: list = []
            self.link = link

    agent = Agent()
    metrics.attach(agent)
    key = ("spececd_edge_broker_connected", ())
    assert samples(metrics.render())[key] == 0
    link.connect()
    assert samples(metrics.render())[key] == 1
    link.shutdown()
    assert samples(metrics.render())[key] == 0


def test_worker_counts_evictions(dev_broker, uid, mqtt_clients, tmp_path) -> None:
    from cloud_worker.worker import Worker
    from shared import topics
    from shared.models import load_model
    from shared.protocol import Open, decode, encode
    from shared.sampling import SamplingParams
    from tests.tiny import make_tiny_model_dir

    target = load_model(str(make_tiny_model_dir(tmp_path / "t", seed=2)))
    metrics = WorkerMetrics()
    worker = Worker(target, dev_broker.config(), worker_id=f"w-{uid}", max_sessions=1, metrics=metrics)
    worker.start()
    metrics.watch_broker(lambda: worker.client.connected.is_set())
    raw = mqtt_clients.make(dev_broker.config())
    raw.subscribe(f"{topics.PREFIX}/{uid}/+/down")
    try:
        for sid in ("s1", "s2", "s3"):
            msg = Open(sid=sid, epoch=0, ctx=(1, 2, 3), sampling=SamplingParams(), draft_model="",
                       target_model="", max_new=8, mode="speculative")  # fmt: skip
            raw.publish(topics.open_topic(uid), encode(msg), response_topic=topics.down_topic(uid, sid))
            deadline = time.monotonic() + 30
            while True:  # wait for this session's `opened` (an eviction notice may come first)
                reply = decode(raw.messages.get(timeout=max(0.1, deadline - time.monotonic())).payload)
                if getattr(reply, "sid", None) == sid and type(reply).__name__ == "Opened":
                    break
        deadline = time.monotonic() + 10
        while samples(metrics.render()).get(("spececd_worker_evictions_total", ()), 0) < 2:
            assert time.monotonic() < deadline, "evictions were not counted"
            time.sleep(0.05)
        assert samples(metrics.render())[("spececd_worker_broker_connected", ())] == 1
    except queue.Empty:
        pytest.fail("the worker never answered an open")
    finally:
        worker.stop()


@pytest.mark.parametrize(("body", "healthy"), [
    (b"spececd_worker_broker_connected 1.0\n", True),
    (b"spececd_worker_broker_connected 0.0\n", False),  # running, but off the broker
    (b"process_cpu_seconds_total 1.0\n", False),
])  # fmt: skip
def test_worker_healthcheck_needs_the_broker(body, healthy) -> None:
    import http.server
    import os
    import sys
    import threading

    class Metrics(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Metrics)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        env = {**os.environ, "SPECECD_METRICS_LISTEN": f"0.0.0.0:{server.server_port}"}
        script = ROOT / "deploy" / "docker" / "healthcheck.py"
        rc = subprocess.run(
            [sys.executable, str(script)], env=env, capture_output=True, timeout=30
        ).returncode
        assert rc == (0 if healthy else 1)
    finally:
        server.shutdown()
        server.server_close()


# ------------------------------------------------------------------ dashboard and alerts
def test_alert_rules_and_prometheus_config_pass_promtool() -> None:
    for args in (["check", "rules", "alerts.yml"], ["check", "config", "prometheus.yml"],
                 ["test", "rules", "alerts_test.yml"]):  # fmt: skip
        out = subprocess.run([promtool(), *args], cwd=PROM, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stdout + out.stderr


def _known_series() -> set[str]:
    worker, edge = WorkerMetrics(), EdgeMetrics()
    worker.bad_message("bad_message")
    edge.request_done("/v1/completions", 200)
    edge.position_judged.labels(position="0")  # labelled series appear once used
    edge.position_accepted.labels(position="0")
    return {name for m in (worker, edge) for name, _ in samples(m.render())}


def test_dashboard_and_rules_use_only_metrics_that_exist() -> None:
    known = _known_series()
    dash = json.loads((ROOT / "deploy" / "grafana" / "spececd.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 20
    exprs += re.findall(r"expr: (.+(?:\n {12}.+)*)", (PROM / "alerts.yml").read_text())
    used = {name for e in exprs for name in re.findall(r"\bspececd_[a-z_]+", e)}
    assert used and used <= known, f"unknown series: {sorted(used - known)}"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))


# ------------------------------------------------------------------ logs
def test_json_logs_drop_uvicorns_color_message() -> None:
    buf = io.StringIO()
    setup_logging("INFO", json=True, stream=buf)
    uvicorn_like = logging.getLogger(
        "spececd.test.uvicorn"
    )  # uvicorn's own logger's level varies by test order
    uvicorn_like.info(
        "Started server process [%d]",
        7,
        extra={"color_message": "Started server process [\x1b[36m%d\x1b[0m]"},
    )
    line = json.loads(buf.getvalue().strip().splitlines()[-1])
    assert line["msg"] == "Started server process [7]" and "color_message" not in line
    assert "\x1b" not in buf.getvalue()
    setup_logging("INFO", json=False, stream=buf)
    uvicorn_like.info("x", extra={"color_message": "\x1b[1mx\x1b[0m"})
    assert "\x1b" not in buf.getvalue()


def test_json_logs_turn_off_progress_bars_and_route_transformers() -> None:
    import huggingface_hub.utils as hub_utils
    import transformers.utils.logging as tf_logging

    buf = io.StringIO()
    verbosity = tf_logging.get_verbosity()  # other tests (the bench) turn transformers down to ERROR
    tf_logging.set_verbosity_warning()
    try:
        setup_logging("INFO", json=True, stream=buf)
        assert not tf_logging.is_progress_bar_enabled()
        assert hub_utils.are_progress_bars_disabled()
        tf_logging.get_logger("transformers.modeling_utils").warning("a library warning")
        lines = [json.loads(x) for x in buf.getvalue().splitlines()]
        assert any(x["msg"] == "a library warning" for x in lines)
    finally:
        tf_logging.enable_progress_bar()
        hub_utils.enable_progress_bars()
        tf_logging.set_verbosity(verbosity)
        setup_logging("WARNING")


# ------------------------------------------------------------------ tap
def test_tap_timeout_without_count_says_how_many(dev_broker, capsys) -> None:
    from shared.tap import main

    filt = f"spececd/v1/nobody-{time.monotonic_ns()}/#"
    cfg = dev_broker.config()
    assert main([filt, "--broker", f"{cfg.host}:{cfg.port}", "--timeout", "0.5"]) == 1
    err = capsys.readouterr().err
    assert "(0 messages)" in err and "of 0" not in err


def test_json_logs_of_a_real_run_are_only_json_lines(tmp_path) -> None:
    """The reproduction: a CLI run with --log-json printed transformers' progress bars between
    the JSON lines."""
    import os
    import sys

    from tests.tiny import make_tiny_model_dir

    draft = make_tiny_model_dir(tmp_path / "draft", seed=1)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("HF_HUB_DISABLE_PROGRESS_BARS", None)
    cmd = [sys.executable, "-m", "edge_agent.cli", "generate", "hi", "--raw", "--mode", "edge-only",
           "--draft", str(draft), "--max-new-tokens", "3", "--log-json", "--log-level", "debug"]  # fmt: skip
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = [line for line in out.stderr.replace("\r", "\n").splitlines() if line.strip()]
    assert lines, "no log lines at all"
    for line in lines:
        record = json.loads(line)  # every line is one JSON object: no bars, no raw library output
        assert "\x1b" not in line and "color_message" not in record
