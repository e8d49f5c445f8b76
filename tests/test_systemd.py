"""The edge's systemd unit: `systemd-analyze verify` is clean, and the unit says what the agent needs."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parent.parent / "deploy" / "systemd" / "spececd-edge.service"
EXEC = "/opt/spececd/bin/spececd-edge"
ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(
    ANALYZE is None, reason="systemd-analyze is not installed (Debian package: systemd)"
)


def directives(text: str) -> dict[str, list[str]]:
    """``Key`` -> every value it is given, across sections (a key may repeat, e.g. Environment)."""
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def verify(unit_text: str, tmp_path: Path) -> tuple[int, str]:
    """Run ``systemd-analyze verify`` on a copy whose ExecStart binary exists on this machine."""
    true_bin = shutil.which("true")
    assert true_bin, "coreutils 'true' is needed to stand in for spececd-edge"
    path = tmp_path / "spececd-edge.service"
    path.write_text(unit_text.replace(EXEC, true_bin))
    proc = subprocess.run(
        [ANALYZE, "verify", "--man=no", str(path)], capture_output=True, text=True, timeout=60
    )
    problems = "\n".join(
        line for line in (proc.stdout + proc.stderr).splitlines() if "spececd-edge.service" in line
    )
    return proc.returncode, problems


@needs_analyze
def test_systemd_analyze_verify_is_clean(tmp_path):
    rc, problems = verify(UNIT.read_text(), tmp_path)
    assert rc == 0 and problems == "", problems


@needs_analyze
@pytest.mark.parametrize(
    ("old", "new"),
    [("WatchdogSec=30s", "WatchdogSecs=30s"), ("Type=notify", "Type=notifyy"), (EXEC, "/no/such/binary")],
)
def test_verify_check_catches_broken_units(tmp_path, old, new):
    rc, problems = verify(UNIT.read_text().replace(old, new), tmp_path)
    assert rc != 0 or problems, f"a unit with {new!r} passed the check"


@needs_analyze
def test_hardening_exposure_is_low(tmp_path):
    path = tmp_path / "spececd-edge.service"
    path.write_text(UNIT.read_text())
    proc = subprocess.run(
        [ANALYZE, "security", "--offline=yes", "--no-pager", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if "--offline" in proc.stderr and proc.returncode != 0:
        pytest.skip(f"this systemd-analyze has no --offline: {proc.stderr.strip()}")
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", proc.stdout + proc.stderr)
    assert m, proc.stdout + proc.stderr
    assert float(m.group(1)) <= 2.5, proc.stdout  # 0 = locked down, 10 = fully exposed


def test_unit_has_notify_watchdog_user_cache_and_secrets():
    d = directives(UNIT.read_text())
    one = {k: v[-1] for k, v in d.items()}
    assert one["Type"] == "notify" and one["NotifyAccess"] == "main"
    assert one["ExecStart"] == f"{EXEC} serve --config /etc/spececd/edge.toml"
    assert one["Restart"] == "on-failure"
    assert re.fullmatch(r"\d+s", one["WatchdogSec"]) and int(one["WatchdogSec"][:-1]) >= 10
    assert one["DynamicUser"] == "yes"
    assert one["StateDirectory"] == "spececd" and one["CacheDirectory"] == "spececd"
    assert "SPECECD_CACHE=%C/spececd" in d["Environment"]
    assert one["EnvironmentFile"].startswith("-/etc/spececd/")
    assert "After" in d and "network-online.target" in one["After"]


def test_unit_hardening_directives():
    one = {k: v[-1] for k, v in directives(UNIT.read_text()).items()}
    expected = {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
        "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes",
        "ProtectControlGroups": "yes",
        "SystemCallFilter": "@system-service",
        "CapabilityBoundingSet": "",
        "RestrictSUIDSGID": "yes",
        "LockPersonality": "yes",
    }
    assert {k: one.get(k) for k in expected} == expected
