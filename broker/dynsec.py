#!/usr/bin/env python3
"""Edit SpecECD's Mosquitto dynamic-security file (dynamic-security.json) offline.

Usage (normally through add-device.sh, add-worker.sh and add-monitor.sh):
    dynsec.py FILE init                        an empty file: no clients, everything denied
    dynsec.py FILE device|worker|monitor NAME  add or re-key NAME; the password is read from stdin
    dynsec.py FILE remove NAME                 delete the client NAME (and its own role)
    dynsec.py FILE migrate PASSWD [ACL]        import the users of an old password file (and the
                                               `user` blocks of its acl_file) with their passwords

Why the dynamic-security plugin (DESIGN §2, broker/README.md): it checks a SUBSCRIBE against
its own ACLs (subscribeLiteral / subscribePattern), apart from what a client may receive
(publishClientReceive). Mosquitto's acl_file accepts every subscription, so a device could join
the workers' share group and black-hole its share of every device's opens.

The plugin of Mosquitto 2.0 has no %u patterns, so every device gets a role of its own. The plugin
reads the file only at start: restart the broker after a change (a SIGHUP does not reload it).
Standard library only: this runs on the broker host.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import sys
from pathlib import Path

PREFIX = "spececd/v1"
SHARE = "$share/spececd-workers"
ITERATIONS = 101  # the plugin's own default (PW_DEFAULT_ITERATIONS)
NAME_RE = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
KINDS = ("device", "worker", "monitor")
WORKER_ROLE = "spececd-worker"
MONITOR_ROLE = "spececd-monitor"


def _acl(acltype: str, topic: str) -> dict[str, object]:
    return {"acltype": acltype, "topic": topic, "allow": True}


def device_acls(name: str) -> list[dict[str, object]]:
    """A device writes its own open and up topics, and subscribes to / receives its own answers
    and the workers' statuses. No shared subscription, no wildcard above its own name."""
    own = f"{PREFIX}/{name}"
    return [
        _acl("publishClientSend", f"{own}/open"),
        _acl("publishClientSend", f"{own}/+/up"),
        _acl("subscribePattern", f"{own}/+/down"),
        _acl("publishClientReceive", f"{own}/+/down"),
        _acl("subscribePattern", f"{PREFIX}/workers/+/status"),
        _acl("publishClientReceive", f"{PREFIX}/workers/+/status"),
    ]


def worker_acls() -> list[dict[str, object]]:
    """What every worker needs: the opens through the workers' share group only, the sessions'
    requests, and every session's answers (workers are one trust domain, see the README)."""
    return [
        _acl("subscribeLiteral", f"{SHARE}/{PREFIX}/+/open"),
        _acl("publishClientReceive", f"{PREFIX}/+/open"),
        _acl("subscribePattern", f"{PREFIX}/+/+/up"),
        _acl("publishClientReceive", f"{PREFIX}/+/+/up"),
        _acl("publishClientSend", f"{PREFIX}/+/+/down"),
    ]


def worker_own_acls(name: str) -> list[dict[str, object]]:
    """A worker's own status topic (retained "online", Last Will "offline")."""
    return [_acl("publishClientSend", f"{PREFIX}/workers/{name}/status")]


def monitor_acls() -> list[dict[str, object]]:
    """Read-only view of all SpecECD traffic, for mosquitto_sub and spececd-tap."""
    return [_acl("subscribePattern", "spececd/#"), _acl("publishClientReceive", "spececd/#")]


def empty() -> dict[str, object]:
    """A file with no clients, in which everything not granted by a role is denied."""
    return {
        "clients": [],
        "groups": [],
        "roles": [],
        "defaultACLAccess": {
            "publishClientSend": False,
            "publishClientReceive": False,
            "subscribe": False,
            "unsubscribe": True,
        },
    }


def hash_password(password: str, salt: bytes | None = None) -> dict[str, object]:
    """The plugin's password fields: PBKDF2-HMAC-SHA512, 12-byte salt, 64-byte hash, base64."""
    salt = os.urandom(12) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, ITERATIONS, 64)
    return {
        "password": base64.b64encode(digest).decode(),
        "salt": base64.b64encode(salt).decode(),
        "iterations": ITERATIONS,
    }


def _set_role(data: dict, rolename: str, acls: list[dict[str, object]]) -> None:
    roles = [r for r in data["roles"] if r["rolename"] != rolename]
    roles.append({"rolename": rolename, "acls": acls})
    data["roles"] = roles


def add(data: dict, kind: str, name: str, password: str) -> None:
    """Add (or re-key) client ``name`` of ``kind`` with its roles."""
    remove(data, name)
    if kind == "device":
        own = f"spececd-device-{name}"
        _set_role(data, own, device_acls(name))
        rolenames = [own]
    elif kind == "worker":
        own = f"spececd-worker-{name}"
        _set_role(data, WORKER_ROLE, worker_acls())
        _set_role(data, own, worker_own_acls(name))
        rolenames = [WORKER_ROLE, own]
    else:
        _set_role(data, MONITOR_ROLE, monitor_acls())
        rolenames = [MONITOR_ROLE]
    client = {"username": name, "textName": f"SpecECD {kind}", **hash_password(password)}
    client["roles"] = [{"rolename": r} for r in rolenames]
    data["clients"].append(client)


def remove(data: dict, name: str) -> bool:
    """Delete client ``name`` and the roles of its own; True when it existed."""
    before = len(data["clients"])
    data["clients"] = [c for c in data["clients"] if c.get("username") != name]
    own = {f"spececd-device-{name}", f"spececd-worker-{name}"}
    data["roles"] = [r for r in data["roles"] if r["rolename"] not in own]
    return len(data["clients"]) < before


def migrate(data: dict, passwd: str, acl: str = "") -> list[str]:
    """Import the users of a mosquitto_passwd file; return warnings for those that could not be.

    mosquitto_passwd 2.0 hashes (``$7$ITERATIONS$SALT$HASH``) are PBKDF2-HMAC-SHA512 with a
    12-byte salt, the plugin's own scheme, so passwords carry over without being known. In the
    old acl_file a ``user NAME`` block with a write rule was a worker, one without was an operator
    (monitor); every other user was a device.
    """
    blocks: dict[str, bool] = {}  # user -> has a write rule
    user = None
    for line in acl.splitlines():
        words = line.split()
        if words[:1] == ["user"] and len(words) == 2:
            user = words[1]
            blocks[user] = False
        elif user is not None and words[:2] == ["topic", "write"]:
            blocks[user] = True
    warnings = []
    for line in passwd.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        name, _, hashed = line.partition(":")
        fields = hashed.split("$")
        if not NAME_RE.fullmatch(name) or name == "workers":
            warnings.append(f"{name!r}: not a valid SpecECD name, skipped")
            continue
        if len(fields) != 5 or fields[1] != "7":
            warnings.append(f"{name}: not a mosquitto_passwd 2.0 ($7$) hash: re-key it with add-*.sh")
            continue
        kind = ("worker" if blocks[name] else "monitor") if name in blocks else "device"
        add(data, kind, name, "unused")  # the roles; the hash is replaced below
        client = next(c for c in data["clients"] if c["username"] == name)
        client.update(password=fields[4], salt=fields[3], iterations=int(fields[2]))
    return warnings


def load(path: Path) -> dict:
    """The file's contents, or an empty file's when it does not exist yet."""
    if not path.exists():
        return empty()
    data = json.loads(path.read_text())
    for key in ("clients", "roles", "groups"):
        data.setdefault(key, [])
    return data


def save(path: Path, data: dict) -> None:
    """Write atomically (the broker may read it at any restart)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.chmod(tmp, 0o640)
    os.replace(tmp, path)


def main(argv: list[str]) -> int:
    """Command line entry point; see the module docstring."""
    if len(argv) < 2 or argv[1] not in (*KINDS, "init", "remove", "migrate"):
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    path, cmd = Path(argv[0]), argv[1]
    if cmd == "init":
        if not path.exists():
            save(path, empty())
        return 0
    if cmd == "migrate" and len(argv) in (3, 4):
        data = load(path)
        acl = Path(argv[3]).read_text() if len(argv) == 4 else ""
        for warning in migrate(data, Path(argv[2]).read_text(), acl):
            print(f"warning: {warning}", file=sys.stderr)
        save(path, data)
        return 0
    if len(argv) != 3:
        print(f"usage: dynsec.py FILE {cmd} NAME", file=sys.stderr)
        return 2
    name = argv[2]
    if not NAME_RE.fullmatch(name) or name == "workers":
        print(f"error: invalid name {name!r}: use 1-64 characters of A-Z a-z 0-9 _ . - (not 'workers')",
              file=sys.stderr)  # fmt: skip
        return 2
    data = load(path)
    if cmd == "remove":
        if not remove(data, name):
            print(f"error: no client {name!r} in {path}", file=sys.stderr)
            return 1
    else:
        password = sys.stdin.readline().rstrip("\n")
        if not password:
            print("error: empty password on stdin", file=sys.stderr)
            return 2
        add(data, cmd, name, password)
    save(path, data)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
