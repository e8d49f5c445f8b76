"""deploy/docker: the compose file against the compose-spec schema and a real compose when present,
its services, health checks and GPU reservations, setup.sh + the broker health check against a
real Mosquitto running the production config, and (with a Docker engine) the whole stack."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from shared.config import keys_for
from tests.brokers import build_retain_guard, mosquitto_missing, prod_missing, render_conf

jsonschema = pytest.importorskip("jsonschema", reason="jsonschema is in the dev extra: pip install -e .[dev]")

REPO = Path(__file__).resolve().parent.parent
DOCKER = REPO / "deploy" / "docker"
COMPOSE = DOCKER / "compose.yaml"
SCHEMA = REPO / "tests" / "data" / "compose-spec.json"
WORKERS = ("worker1", "worker2")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())  # safe_load resolves the `<<` merge keys


def schema_errors(doc: dict) -> list[str]:
    validator = jsonschema.Draft201909Validator(json.loads(SCHEMA.read_text()))
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


def test_compose_file_matches_the_compose_spec_schema(compose):
    assert schema_errors(compose) == []


def test_schema_check_catches_mistakes(compose):
    broken = yaml.safe_load(COMPOSE.read_text())
    broken["services"]["worker1"]["deploy"]["resources"]["reservations"]["devices"][0]["capabilitys"] = [
        "gpu"
    ]
    broken["services"]["mosquitto"]["depends_on"]["broker-init"]["condition"] = "service_ready"
    errors = schema_errors(broken)
    assert any("capabilitys" in e for e in errors) and any("service_ready" in e for e in errors), errors


def compose_cli() -> list[str] | None:
    for cmd in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(cmd[0]) and subprocess.run([*cmd, "version"], capture_output=True).returncode == 0:
            return cmd
    return None


@pytest.mark.skipif(
    compose_cli() is None, reason="no compose implementation (docker compose plugin or docker-compose)"
)
def test_real_compose_accepts_the_file(tmp_path):
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    for name in ("hf_token", "healthcheck.password", "worker1.password", "worker2.password"):
        (secrets / name).write_text("x\n")
    env = {**os.environ, "SPECECD_SECRETS_DIR": str(secrets), "SPECECD_BROKER_DIR": str(tmp_path)}
    proc = subprocess.run(
        [*compose_cli(), "-f", str(COMPOSE), "config", "-q"], capture_output=True, text=True, env=env
    )
    assert proc.returncode == 0, proc.stderr


def test_broker_service_runs_the_projects_production_config(compose):
    services = compose["services"]
    broker = services["mosquitto"]
    assert broker["build"]["dockerfile"] == "deploy/docker/Dockerfile.mosquitto"  # + the retain guard
    assert (DOCKER / broker["build"]["context"] / broker["build"]["dockerfile"]).is_file()
    conf_mount = next(v for v in broker["volumes"] if v.endswith(":/mosquitto/config/mosquitto.conf:ro"))
    assert (DOCKER / conf_mount.split(":")[0]).resolve() == REPO / "broker" / "mosquitto-main.conf"
    snippet = next(v for v in broker["volumes"] if v.endswith(":/etc/mosquitto/conf.d/spececd.conf:ro"))
    assert (DOCKER / snippet.split(":")[0]).resolve() == REPO / "broker" / "mosquitto-prod.conf"
    prod = (REPO / "broker" / "mosquitto-prod.conf").read_text()
    for path in re.findall(r"^(?:certfile|keyfile|cafile|plugin_opt_config_file) (\S+)", prod, re.M):
        assert path.startswith("/etc/mosquitto/spececd/"), path  # all served by the broker-etc volume
    assert "broker-etc:/etc/mosquitto/spececd:ro" in broker["volumes"]
    assert "use_username_as_clientid true" in prod
    assert broker["depends_on"] == {"broker-init": {"condition": "service_completed_successfully"}}
    assert broker["restart"] == "unless-stopped" and services["broker-init"]["restart"] == "no"
    assert "mosquitto_sub" in broker["healthcheck"]["test"][1]
    assert broker["ports"] == ["${SPECECD_MQTT_PORT:-8883}:8883"]


def test_workers_gpu_health_secrets_and_identities(compose):
    services = compose["services"]
    usernames, password_secrets = set(), set()
    for name in WORKERS:
        w = services[name]
        assert w["depends_on"] == {"mosquitto": {"condition": "service_healthy"}}
        assert w["restart"] == "unless-stopped"
        assert w["command"] == ["--config", "/etc/spececd/worker.toml"]
        assert w["healthcheck"]["test"] == ["CMD", "python3", "/opt/spececd/healthcheck.py"]
        (device,) = w["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
        assert "model-cache:/var/cache/spececd" in w["volumes"]
        env = w["environment"]
        assert {k.removeprefix("SPECECD_").lower() for k in env} <= set(keys_for("worker")), env
        assert env["SPECECD_HF_TOKEN_FILE"] == "/run/secrets/hf_token" and "hf_token" in w["secrets"]
        secret = env["SPECECD_PASSWORD_FILE"].removeprefix("/run/secrets/")
        assert secret in w["secrets"] and secret in compose["secrets"]
        usernames.add(env["SPECECD_USERNAME"])
        password_secrets.add(secret)
        assert (DOCKER / w["build"]["context"] / w["build"]["dockerfile"]).is_file()
    # one MQTT user per worker (use_username_as_clientid: a shared user would kick the other off)
    assert len(usernames) == len(password_secrets) == len(WORKERS)
    assert set(compose["volumes"]) >= {"model-cache", "broker-etc", "broker-data"}
    assert set(compose["secrets"]["hf_token"]) == {"file"}


def test_dockerfiles_are_non_root_with_healthcheck():
    for name, base in (("Dockerfile.worker", "nvidia/cuda:"), ("Dockerfile.worker-cpu", "python:")):
        text = (DOCKER / name).read_text()
        assert re.search(rf"^(ARG BASE_IMAGE=|FROM ){re.escape(base)}", text, re.M), name
        assert re.search(r"^USER spececd$", text, re.M) and "--uid 10001" in text
        assert re.search(
            r"^HEALTHCHECK .*\n\s+CMD \[\"python3\", \"/opt/spececd/healthcheck.py\"\]", text, re.M
        )
        assert 'ENTRYPOINT ["spececd-worker"]' in text
        assert 'CMD ["--config", "/etc/spececd/worker.toml"]' in text
        for src in re.findall(r"^COPY (\S+) ", text, re.M):
            assert (REPO / src).exists() or src == "README.md", src  # README.md comes with the repo


def test_worker_healthcheck_probes_the_metrics_endpoint():
    import http.server
    import threading

    class Metrics(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/metrics" else 404)
            self.end_headers()
            self.wfile.write(b"spececd_worker_broker_connected 1.0\n")  # healthy: see tests/test_ops.py

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Metrics)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    script = str(DOCKER / "healthcheck.py")
    try:
        env = {**os.environ, "SPECECD_METRICS_LISTEN": f"0.0.0.0:{server.server_port}"}
        assert subprocess.run([sys.executable, script], env=env, capture_output=True).returncode == 0
    finally:
        server.shutdown()
    env = {**os.environ, "SPECECD_METRICS_LISTEN": f"127.0.0.1:{server.server_port}"}  # closed now
    assert subprocess.run([sys.executable, script], env=env, capture_output=True).returncode == 1


def run_setup(tmp_path: Path, *args: str) -> tuple[Path, Path]:
    broker_dir, secrets = tmp_path / "broker-files", tmp_path / "secrets"
    env = {**os.environ, "SPECECD_BROKER_DIR": str(broker_dir), "SPECECD_SECRETS_DIR": str(secrets)}
    proc = subprocess.run(["bash", str(DOCKER / "setup.sh"), *args], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return broker_dir, secrets


@pytest.mark.broker
@pytest.mark.skipif(prod_missing() is not None, reason=str(prod_missing()))
def test_setup_files_serve_the_prod_broker_and_its_healthcheck_passes(tmp_path, compose):
    broker_dir, secrets = run_setup(tmp_path)
    run_setup(tmp_path, "device", "kitchen-01")
    assert (secrets / "kitchen-01.password").read_text().strip()
    data = tmp_path / "data"
    data.mkdir()
    from tests.brokers import Broker, free_port

    conf = tmp_path / "mosquitto.conf"
    port = free_port()
    prod = (REPO / "broker" / "mosquitto-prod.conf").read_text()
    build_retain_guard(broker_dir)  # the image builds it (Dockerfile.mosquitto); here, the host
    conf.write_text(render_conf(prod, port=port, confdir=broker_dir, datadir=data))
    broker = Broker(kind="prod", workdir=tmp_path, conf=conf, port=port)
    broker.start()
    try:
        check = compose["services"]["mosquitto"]["healthcheck"]["test"][1].replace("$$", "$")
        check = check.replace("-p 8883", f"-p {port}").replace("/etc/mosquitto/spececd", str(broker_dir))

        def probe(password_file: Path, user: str = "healthcheck") -> int:
            cmd = check.replace("/run/secrets/healthcheck_password", str(password_file))
            cmd = cmd.replace("-u healthcheck", f"-u {user}")
            return subprocess.run(["sh", "-c", cmd], capture_output=True, timeout=20).returncode

        assert probe(secrets / "healthcheck.password") == 0
        assert probe(secrets / "worker1.password", "worker1") == 0
        assert probe(secrets / "kitchen-01.password", "kitchen-01") == 0
        wrong = tmp_path / "wrong"
        wrong.write_text("not-the-password\n")
        assert probe(wrong) != 0
    finally:
        broker.stop()


def docker_engine_missing() -> str | None:
    """Why the stack cannot be brought up here, or None."""
    try:
        import docker

        docker.from_env().ping()
    except Exception as exc:  # no engine: DockerException, connection refused, no socket, ...
        return f"no Docker engine reachable (docker.from_env().ping(): {type(exc).__name__}: {exc})"
    if compose_cli() is None:
        return "a Docker engine answers but no compose CLI is installed (docker compose plugin)"
    return mosquitto_missing()  # setup.sh needs python3 and openssl on the host


@pytest.mark.slow
@pytest.mark.skipif(docker_engine_missing() is not None, reason=str(docker_engine_missing()))
def test_stack_comes_up_and_serves_one_generation(tmp_path):
    """The real stack: CPU image of worker1 with a tiny target, the prod broker, one edge generation."""
    from tests.brokers import free_port
    from tests.tiny import make_tiny_model_dir

    broker_dir, secrets = run_setup(tmp_path)
    run_setup(tmp_path, "device", "it-device")
    model = make_tiny_model_dir(tmp_path / "model", arch="llama")
    model.chmod(0o755)
    stack = yaml.safe_load(COMPOSE.read_text())
    stack = {k: v for k, v in stack.items() if not k.startswith("x-")}
    del stack["services"]["worker2"]
    del stack["secrets"]["worker2_password"]
    worker = stack["services"]["worker1"]
    del worker["deploy"]  # no GPU on a CI machine
    worker["build"]["dockerfile"] = "deploy/docker/Dockerfile.worker-cpu"
    worker["image"] = "spececd-worker:it-cpu"
    worker["volumes"].append(f"{model}:/models/tiny:ro")
    worker["environment"].update(SPECECD_TARGET="/models/tiny", SPECECD_DRAFT=str(model))
    for path in secrets.iterdir():
        path.chmod(0o644)  # the worker's uid reads them through the bind mount
    file = tmp_path / "compose.yaml"
    file.write_text(yaml.safe_dump(stack))
    port = free_port()
    project = f"spececd-it-{os.getpid()}"
    env = {
        **os.environ,
        "SPECECD_BROKER_DIR": str(broker_dir),
        "SPECECD_SECRETS_DIR": str(secrets),
        "SPECECD_MQTT_PORT": str(port),
    }
    base = [*compose_cli(), "-p", project, "-f", str(file), "--project-directory", str(DOCKER)]
    try:
        up = subprocess.run(
            [*base, "up", "-d", "--build", "--wait", "--wait-timeout", "900"],
            env=env,
            capture_output=True,
            text=True,
            timeout=1800,
        )
        assert up.returncode == 0, up.stdout + up.stderr
        edge_env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("SPECECD_")},
            "SPECECD_BROKER": f"localhost:{port}",
            "SPECECD_TLS_CA": str(broker_dir / "certs" / "ca.crt"),
            "SPECECD_USERNAME": "it-device",
            "SPECECD_PASSWORD_FILE": str(secrets / "it-device.password"),
            "SPECECD_DRAFT": str(model),
            "SPECECD_TARGET": "/models/tiny",
            "SPECECD_MODEL_DEVICE": "cpu",
        }
        gen = subprocess.run(
            [
                sys.executable,
                "-m",
                "edge_agent.cli",
                "generate",
                "Water boils",
                "--max-new-tokens",
                "8",
            ],
            env=edge_env,
            capture_output=True,
            text=True,
            timeout=300,
            cwd=REPO,
        )
        assert gen.returncode == 0, gen.stdout + gen.stderr
        assert gen.stdout.strip(), "the generation printed nothing"
    finally:
        logs = subprocess.run([*base, "logs", "--no-color"], env=env, capture_output=True, text=True)
        subprocess.run([*base, "down", "-v", "--remove-orphans"], env=env, capture_output=True, timeout=300)
        print(logs.stdout[-5000:])
