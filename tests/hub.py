"""A local stand-in for the Hugging Face hub's HTTP API (the few routes ``snapshot_download``
uses), serving model folders made by ``tests/tiny.py``: point ``HF_ENDPOINT`` at ``url``."""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

SHA = "0123456789abcdef0123456789abcdef01234567"  # the one commit every repo is at


class FakeHub:
    """Serves ``repos`` ({"org/name": folder}) until ``stop()``; records the paths asked for."""

    def __init__(self, repos: dict[str, Path], *, gated: frozenset[str] = frozenset()) -> None:
        self.repos, self.gated = repos, gated
        self.requests: list[str] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_args) -> None:
                pass

            def do_HEAD(self) -> None:
                self._answer(body=False)

            def do_GET(self) -> None:
                self._answer(body=True)

            def _send(self, status: int, data: bytes, headers: dict[str, str], body: bool) -> None:
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if body:
                    self.wfile.write(data)

            def _answer(self, body: bool) -> None:
                path = unquote(urlparse(self.path).path)
                hub.requests.append(path)
                parts = path.strip("/").split("/")
                if parts[:2] == ["api", "models"]:
                    repo, rest = "/".join(parts[2:4]), parts[4:]
                else:
                    repo, rest = "/".join(parts[:2]), parts[2:]
                folder = hub.repos.get(repo)
                if folder is None:
                    self._send(
                        404, b'{"error": "Repository not found"}', {"X-Error-Code": "RepoNotFound"}, body
                    )
                    return
                if repo in hub.gated:
                    self._send(401, b'{"error": "gated"}', {"X-Error-Code": "GatedRepo"}, body)
                    return
                files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
                if parts[:2] == ["api", "models"] and rest[:1] == ["revision"]:
                    info = {"id": repo, "sha": SHA, "siblings": [{"rfilename": f} for f in files]}
                    self._send(200, json.dumps(info).encode(), {"Content-Type": "application/json"}, body)
                elif parts[:2] == ["api", "models"] and rest[:1] == ["tree"]:
                    tree = [{"type": "file", "oid": _oid(folder / f), "size": (folder / f).stat().st_size, "path": f}
                            for f in files]  # fmt: skip
                    self._send(200, json.dumps(tree).encode(), {"Content-Type": "application/json"}, body)
                elif rest[:1] == ["resolve"] and "/".join(rest[2:]) in files:
                    f = folder / "/".join(rest[2:])
                    headers = {
                        "X-Repo-Commit": SHA,
                        "ETag": f'"{_oid(f)}"',
                        "Content-Type": "application/octet-stream",
                    }
                    self._send(200, f.read_bytes(), headers, body)
                else:
                    self._send(404, b'{"error": "Entry not found"}', {"X-Error-Code": "EntryNotFound"}, body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _oid(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()
