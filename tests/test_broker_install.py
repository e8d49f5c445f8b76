"""The production broker config works both ways broker/README.md installs it (issue 11 #7).

1. Debian: ``broker/mosquitto-prod.conf`` as ``/etc/mosquitto/conf.d/spececd.conf``, included by
   the stock ``/etc/mosquitto/mosquitto.conf`` (tests/data/debian-mosquitto.conf, verbatim), which
   already sets pid_file, persistence, persistence_location and log_dest. Mosquitto used to exit 3
   with "Duplicate persistence_location value".
2. Anywhere else (the Docker image, ``mosquitto -c``): ``broker/mosquitto-main.conf`` including the
   same snippet. The ``prod_broker`` fixture of every other broker test runs this way.

The stock file's paths are moved into a temp dir and the listener gets a free port; nothing else
changes. Each case proves the broker serves: a device's TLS login, and a worker's publish delivered.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from shared.errors import BrokerAuthError, BrokerError
from shared.topics import OPEN_SHARED_FILTER, down_topic
from tests.brokers import (
    BROKER_DIR,
    PROD_USERS,
    Broker,
    Clients,
    build_retain_guard,
    free_port,
    prod_missing,
    render_conf,
    start_broker,
)
from tests.brokers import _prepare_prod as prepare_prod

DEBIAN_CONF = Path(__file__).parent / "data" / "debian-mosquitto.conf"

pytestmark = [pytest.mark.broker, pytest.mark.skipif(prod_missing() is not None, reason=str(prod_missing()))]


def _debian_layout(root: Path, port: int) -> Path:
    """Debian's /etc/mosquitto tree under ``root``: the stock main config, conf.d/spececd.conf."""
    etc, confd, spececd = root / "etc-mosquitto", root / "etc-mosquitto" / "conf.d", root / "spececd"
    for d in (confd, root / "run", root / "lib", root / "log"):
        d.mkdir(parents=True, exist_ok=True)
    stock = DEBIAN_CONF.read_text()
    for old, new in (
        ("/run/mosquitto", root / "run"),
        ("/var/lib/mosquitto", root / "lib"),
        ("/var/log/mosquitto", root / "log"),
        ("/etc/mosquitto/conf.d", confd),
    ):
        stock = stock.replace(old, str(new))
    if os.geteuid() == 0:
        stock += "user root\n"  # else it drops to `mosquitto`, which cannot read pytest's temp dirs
    (etc / "mosquitto.conf").write_text(stock)
    snippet = (BROKER_DIR / "mosquitto-prod.conf").read_text()
    rendered = render_conf(snippet, port=port, confdir=spececd, datadir=root / "lib", main=False)
    (confd / "spececd.conf").write_text(rendered)  # the README's `cp` step
    return etc / "mosquitto.conf"


def _errors(log: str) -> list[str]:
    """Mosquitto's error lines, less the one ``Broker.start``'s readiness probe may cause: it
    opens a bare TCP connection to the TLS port and closes it, which Mosquitto can log as an
    OpenSSL "unexpected eof" (seen once in CI, a timing matter)."""
    probe = "SSL routines::unexpected eof while reading"
    return [line for line in log.splitlines() if "Error" in line and probe not in line]


def _serves(broker: Broker) -> None:
    clients = Clients()
    try:
        dev = clients.make(broker.config("devA"))
        dev.subscribe(down_topic("devA", "s1"))
        clients.make(broker.config("worker1")).publish(down_topic("devA", "s1"), b"ok", wait=True)
        assert dev.messages.get(timeout=5).payload == b"ok"
    finally:
        clients.close_all()


def test_included_from_debians_stock_config(tmp_path):
    spececd = tmp_path / "spececd"
    prepare_prod(spececd)
    port = free_port()
    conf = _debian_layout(tmp_path, port)
    broker = Broker(kind="prod", workdir=tmp_path, conf=conf, port=port, ca_file=spececd / "certs" / "ca.crt")
    broker.users = dict(PROD_USERS)
    broker.start()  # raises with mosquitto's log when it exits (it exited 3 before the split)
    try:
        _serves(broker)
    finally:
        broker.stop()
    assert (tmp_path / "lib" / "mosquitto.db").exists()  # Debian's persistence is in force
    log = (tmp_path / "log" / "mosquitto.log").read_text()
    assert "Duplicate" not in log and _errors(log) == [], log


def test_snippet_sets_no_option_that_a_main_config_owns():
    """Options Mosquitto refuses twice, or that Debian's main config already sets."""
    snippet = (BROKER_DIR / "mosquitto-prod.conf").read_text()
    owned = ("pid_file", "persistence", "persistence_location", "persistence_file", "log_dest", "user")
    for line in snippet.splitlines():
        assert line.split(" ", 1)[0] not in owned, line
    main = (BROKER_DIR / "mosquitto-main.conf").read_text()
    assert "include_dir /etc/mosquitto/conf.d" in main and "listener" not in main


def test_retain_guard_builds_without_warnings(tmp_path):
    """-Werror: the plugin must compile cleanly against the installed mosquitto-dev headers."""
    so = build_retain_guard(tmp_path)
    assert so.is_file()
    out = subprocess.run(["nm", "-D", "--defined-only", str(so)], capture_output=True, text=True)
    if out.returncode == 0:
        for symbol in ("mosquitto_plugin_version", "mosquitto_plugin_init", "mosquitto_plugin_cleanup"):
            assert symbol in out.stdout


def test_rekey_and_remove_take_effect_at_restart(tmp_path):
    """add-device.sh on an existing name replaces its password; dynsec.py remove deletes the
    client and its role. The plugin reads the file at start, so the broker is restarted."""
    broker = start_broker("prod", tmp_path / "b")
    etc = tmp_path / "b" / "etc"
    env = {**os.environ, "SPECECD_BROKER_DIR": str(etc)}
    clients = Clients()
    try:
        subprocess.run(
            [str(BROKER_DIR / "add-device.sh"), "devA", "new-pw"], check=True, env=env, capture_output=True
        )
        subprocess.run(
            ["python3", str(BROKER_DIR / "dynsec.py"), str(etc / "dynamic-security.json"), "remove", "devB"],
            check=True, capture_output=True,
        )  # fmt: skip
        clients.make(broker.config("devB"))  # still in force: nothing reloaded yet
        clients.close_all()
        broker.restart()
        for user, password in (("devA", "pw-devA"), ("devB", "pw-devB")):
            with pytest.raises(BrokerAuthError):
                clients.make(broker.config(user, password=password))
        broker.users["devA"] = "new-pw"
        _serves(broker)
    finally:
        clients.close_all()
        broker.stop()
    roles = {r["rolename"] for r in json.loads((etc / "dynamic-security.json").read_text())["roles"]}
    assert "spececd-device-devB" not in roles and "spececd-device-devA" in roles


def test_migrating_an_acl_file_deployment_keeps_passwords_and_rights(tmp_path):
    """`dynsec.py FILE migrate passwd acl` turns the old password file and acl_file into clients
    with the same passwords (mosquitto_passwd 2.0 and the plugin share PBKDF2-SHA512) and roles:
    `user` blocks with a write rule are workers, without one operators, the rest devices."""
    old = tmp_path / "old"
    old.mkdir()
    passwd = old / "passwd"
    passwd.touch()
    for name, password in (("kitchen", "pw-k"), ("gpu1", "pw-g"), ("ops", "pw-o")):
        subprocess.run(
            ["mosquitto_passwd", "-b", str(passwd), name, password], check=True, capture_output=True
        )
    passwd.write_text(passwd.read_text() + "legacy:$6$abc$def\n")  # a pre-2.0 hash cannot carry over
    acl = old / "acl"
    acl.write_text(
        "pattern write spececd/v1/%u/open\n\nuser gpu1\ntopic read spececd/v1/+/open\n"
        "topic write spececd/v1/+/+/down\n\nuser ops\ntopic read spececd/#\n"
    )

    broker = start_broker("prod", tmp_path / "b")
    dynsec = tmp_path / "b" / "etc" / "dynamic-security.json"
    proc = subprocess.run(
        ["python3", str(BROKER_DIR / "dynsec.py"), str(dynsec), "migrate", str(passwd), str(acl)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 0 and "legacy" in proc.stderr and "re-key" in proc.stderr, proc.stderr
    broker.users.update(kitchen="pw-k", gpu1="pw-g", ops="pw-o")
    clients = Clients()
    try:
        broker.restart()
        clients.make(broker.config("gpu1")).subscribe(OPEN_SHARED_FILTER)
        clients.make(broker.config("ops")).subscribe("spececd/#")
        kitchen = clients.make(broker.config("kitchen"))
        kitchen.subscribe("spececd/v1/kitchen/+/down")
        with pytest.raises(BrokerError, match="Not authorized"):
            kitchen.subscribe(OPEN_SHARED_FILTER)
    finally:
        clients.close_all()
        broker.stop()


def _mosquitto_uid() -> int | None:
    try:
        import pwd

        return pwd.getpwnam("mosquitto").pw_uid
    except KeyError:
        return None


@pytest.mark.skipif(os.geteuid() != 0 or _mosquitto_uid() is None, reason="needs root and a mosquitto user")
def test_files_made_by_the_scripts_are_readable_after_the_broker_drops_root():
    """As in production: started as root, Mosquitto drops to the `mosquitto` user before it loads
    the plugins, so the dynamic-security file must be root:mosquitto 0640 (the scripts' job), and
    the retain guard must still refuse a device's retained publish. Pytest's temp dirs are 0700,
    so this one runs under a 0755 dir of its own."""
    import shutil
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="spececd-drop-"))
    try:
        root.chmod(0o755)
        confdir, datadir, includedir = root / "etc", root / "data", root / "conf.d"
        prepare_prod(confdir)
        for d in (datadir, includedir):
            d.mkdir(mode=0o755)
        os.chown(datadir, _mosquitto_uid(), -1)  # type: ignore[arg-type]
        port = free_port()
        main = (BROKER_DIR / "mosquitto-main.conf").read_text()
        main = render_conf(main, port=None, confdir=confdir, datadir=datadir, includedir=includedir)
        (root / "mosquitto.conf").write_text(main.replace("user root\n", ""))  # drop to mosquitto
        snippet = (BROKER_DIR / "mosquitto-prod.conf").read_text()
        snippet = render_conf(snippet, port=port, confdir=confdir, datadir=datadir, main=False)
        (includedir / "spececd.conf").write_text(snippet)
        broker = Broker(kind="prod", workdir=root, conf=root / "mosquitto.conf", port=port,
                        users=dict(PROD_USERS), ca_file=confdir / "certs" / "ca.crt")  # fmt: skip
        broker.start()
        try:
            _serves(broker)
            clients = Clients()
            try:
                with pytest.raises(BrokerAuthError, match="refused the publish"):
                    clients.make(broker.config("devA")).publish(
                        "spececd/v1/devA/open", b"r", retain=True, wait=True
                    )
            finally:
                clients.close_all()
        finally:
            broker.stop()
        log = broker.log.read_text()
        assert _errors(log) == [], log  # e.g. a file the dropped-privilege broker cannot read
    finally:
        shutil.rmtree(root, ignore_errors=True)
