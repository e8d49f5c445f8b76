"""Real Mosquitto brokers for tests, started from the project's own configs in broker/.

The fixtures in conftest.py use these helpers. A broker is rendered from ``broker/mosquitto-dev.conf``
or ``broker/mosquitto-prod.conf`` into a temp dir: the ``listener`` line gets a free port on
127.0.0.1, ``/etc/mosquitto/spececd`` and ``/var/lib/mosquitto`` become temp paths, and when the
tests run as root ``user root`` is appended (mosquitto started as root would otherwise drop to the
``mosquitto`` user, which cannot read pytest's 0700 temp dirs). The prod broker runs the way the
Docker image does: ``broker/mosquitto-main.conf`` including ``broker/mosquitto-prod.conf`` from a
conf.d dir. Its CA and dynamic-security file are made with the project's own scripts
(make-dev-ca.sh, add-device.sh, add-worker.sh, add-monitor.sh), so the tests exercise them too.
"""

from __future__ import annotations

import glob
import itertools
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from shared.mqtt import BrokerConfig, MqttClient, TLSConfig, make_client

REPO = Path(__file__).resolve().parent.parent
BROKER_DIR = REPO / "broker"
PROD_USERS = {
    "devA": "pw-devA",
    "devB": "pw-devB",
    "worker1": "pw-worker1",
    "worker2": "pw-worker2",
    "monitor": "pw-monitor",
}
PROD_WORKERS = ("worker1", "worker2")
PROD_MONITORS = ("monitor",)
PLUGIN_PREFIX = "/usr/local/lib/mosquitto"  # where `make -C broker/retain-guard install` puts the plugin
DYNSEC_PLUGIN_PATHS = ("/usr/lib/*/mosquitto_dynamic_security.so", "/usr/lib/mosquitto_dynamic_security.so")


def mosquitto_missing() -> str | None:
    """Why broker tests cannot run here, or None when they can."""
    for tool in ("mosquitto", "openssl", "python3"):
        if shutil.which(tool) is None:
            return f"{tool} not installed (apt-get install mosquitto mosquitto-clients openssl python3)"
    return None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def render_conf(
    text: str,
    *,
    port: int | None,
    confdir: Path,
    datadir: Path,
    includedir: Path | None = None,
    main: bool = True,
) -> str:
    """The broker config ``text`` with its listener on ``port`` and its paths in temp dirs.

    ``port`` None: a main config without a listener of its own (it includes one from
    ``includedir``, which replaces ``/etc/mosquitto/conf.d``). ``main`` False: a conf.d snippet,
    which must not repeat the main config's ``user root``.
    """
    lines = []
    for line in text.splitlines():
        if line.startswith("listener ") and port is not None:
            line = f"listener {port} 127.0.0.1"
        if includedir is not None:
            line = line.replace("/etc/mosquitto/conf.d", str(includedir))
        line = line.replace("/etc/mosquitto/spececd", str(confdir)).replace(
            f"{PLUGIN_PREFIX}/", f"{confdir}/"
        )
        lines.append(line.replace("/var/lib/mosquitto", str(datadir)))
    if sum(line.startswith("listener ") for line in lines) != (0 if port is None else 1):
        raise ValueError("the broker config must have exactly one `listener` line (none in a main config)")
    if os.geteuid() == 0 and main:
        lines.append("user root")
    return "\n".join(lines) + "\n"


@dataclass
class Broker:
    """A running mosquitto of this test run: where it listens and how to log in."""

    kind: str  # "dev" or "prod"
    workdir: Path
    conf: Path
    port: int
    host: str = "127.0.0.1"
    users: dict[str, str] = field(default_factory=dict)  # prod: username -> password
    ca_file: Path | None = None  # prod: the CA that signed the broker's certificate
    proc: subprocess.Popen[bytes] | None = None

    @property
    def log(self) -> Path:
        """Mosquitto's stderr (all runs of this broker)."""
        return self.workdir / "mosquitto.log"

    def config(
        self, username: str | None = None, *, password: str | None = None, ca_file: Path | None = None
    ) -> BrokerConfig:
        """A BrokerConfig for this broker; on prod, ``username``'s password and TLS with our CA."""
        if self.kind == "dev":
            return BrokerConfig(host=self.host, port=self.port, username=username, password=password)
        if password is None and username is not None:
            password = self.users.get(username)
        ca = ca_file or self.ca_file
        return BrokerConfig(
            host="localhost",
            port=self.port,
            username=username,
            password=password,
            tls=TLSConfig(ca_file=str(ca)),
        )

    def start(self, timeout: float = 5.0) -> None:
        """Start mosquitto and wait until it accepts TCP connections."""
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                ["mosquitto", "-c", str(self.conf)],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited with {self.proc.returncode}:\n{self.log.read_text()}")
            try:
                socket.create_connection((self.host, self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"mosquitto did not listen on {self.port} in {timeout} s:\n{self.log.read_text()}")

    def stop(self, *, crash: bool = False) -> None:
        """Stop the broker: SIGTERM (clean), or SIGKILL with ``crash`` (no goodbye to anyone)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGKILL if crash else signal.SIGTERM)
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)

    def restart(self, downtime: float = 0.0, *, crash: bool = False) -> None:
        """Stop the broker, stay down ``downtime`` seconds, start it again on the same port."""
        self.stop(crash=crash)
        time.sleep(downtime)
        self.start()


def start_broker(kind: str, workdir: Path) -> Broker:
    """Render the ``kind`` ("dev" or "prod") config into ``workdir`` and start mosquitto on a free port."""
    workdir.mkdir(parents=True, exist_ok=True)
    confdir, datadir = workdir / "etc", workdir / "data"
    datadir.mkdir(exist_ok=True)
    broker = Broker(kind=kind, workdir=workdir, conf=workdir / "mosquitto.conf", port=0)
    if kind == "prod":
        _prepare_prod(confdir)
        broker.users = dict(PROD_USERS)
        broker.ca_file = confdir / "certs" / "ca.crt"
    src = (BROKER_DIR / f"mosquitto-{kind}.conf").read_text()
    includedir = workdir / "conf.d"
    if kind == "prod":  # as in the Docker image: the main config includes the prod snippet
        includedir.mkdir(exist_ok=True)
        main = (BROKER_DIR / "mosquitto-main.conf").read_text()
        broker.conf.write_text(
            render_conf(main, port=None, confdir=confdir, datadir=datadir, includedir=includedir)
        )
    for attempt in itertools.count():  # another process may grab the free port before mosquitto
        broker.port = free_port()
        if kind == "prod":
            snippet = render_conf(src, port=broker.port, confdir=confdir, datadir=datadir, main=False)
            (includedir / "spececd.conf").write_text(snippet)
        else:
            broker.conf.write_text(render_conf(src, port=broker.port, confdir=confdir, datadir=datadir))
        try:
            broker.start()
            return broker
        except RuntimeError:
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


def prod_missing() -> str | None:
    """Why the prod broker cannot run here (its retain-guard plugin must be compiled), or None."""
    if shutil.which("make") is None or shutil.which("cc") is None:
        return "make or cc missing: apt-get install make gcc (to build broker/retain-guard)"
    if not Path("/usr/include/mosquitto_plugin.h").exists():
        return "mosquitto_plugin.h missing: apt-get install mosquitto-dev (to build broker/retain-guard)"
    if not Path("/usr/include/mosquitto.h").exists():
        return "mosquitto.h missing: apt-get install libmosquitto-dev (to build broker/retain-guard)"
    if not any(glob.glob(pattern) for pattern in DYNSEC_PLUGIN_PATHS):
        return "mosquitto_dynamic_security.so not found (Debian's mosquitto package has it)"
    return mosquitto_missing()


def build_retain_guard(outdir: Path) -> Path:
    """Compile broker/retain-guard into ``outdir`` (where rendered configs look for it)."""
    outdir.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["make", "-s", "-C", str(BROKER_DIR / "retain-guard"), f"OUT={outdir}"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return outdir / "spececd_retain_guard.so"


def _prepare_prod(confdir: Path) -> None:
    env = {**os.environ, "SPECECD_BROKER_DIR": str(confdir)}

    def run(*args: str) -> None:
        subprocess.run(args, check=True, env=env, capture_output=True, timeout=30)

    build_retain_guard(confdir)

    run(str(BROKER_DIR / "make-dev-ca.sh"), str(confdir / "certs"), "localhost")
    for user, password in PROD_USERS.items():
        kind = "worker" if user in PROD_WORKERS else "monitor" if user in PROD_MONITORS else "device"
        run(str(BROKER_DIR / f"add-{kind}.sh"), user, password)


class Clients:
    """Makes connected MqttClients for a test and closes them all at teardown."""

    def __init__(self) -> None:
        self._clients: list[MqttClient] = []

    def make(
        self, config: BrokerConfig, *, client_id: str | None = None, connect: bool = True, **kwargs: object
    ) -> MqttClient:
        """A client of ``config`` (client id defaults to the username or a unique id), connected."""
        cid = client_id or config.username or f"test-{uuid.uuid4().hex[:12]}"
        client = make_client(config, client_id=cid, **kwargs)  # type: ignore[arg-type]
        self._clients.append(client)
        if connect:
            client.connect(timeout=5)
        return client

    def close_all(self) -> None:
        """Close every client made here."""
        for client in self._clients:
            client.close(timeout=1)
        self._clients.clear()
