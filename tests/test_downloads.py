"""Hub downloads (issue 11 item 6): only with allow_download, never under HF_HUB_OFFLINE, with a
progress bar, and an empty cache says how to allow the download. A local stand-in for the hub
(tests/hub.py) serves a tiny real model over HTTP; HF_ENDPOINT points at it."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from shared.errors import ModelLoadError
from shared.models import load_model
from tests.hub import FakeHub
from tests.tiny import make_tiny_model_dir

ROOT = Path(__file__).resolve().parent.parent
REPO = "tinyorg/tiny-llama"


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    src = make_tiny_model_dir(tmp_path_factory.mktemp("hub") / "src", seed=1)
    hub = FakeHub({REPO: src, "tinyorg/gated": src}, gated=frozenset({"tinyorg/gated"}))
    yield hub
    hub.stop()


@pytest.fixture
def endpoint(hub, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    hub.requests.clear()
    return hub


def test_allowed_download_fetches_with_a_progress_bar_then_loads(endpoint, tmp_path, capfd) -> None:
    model = load_model(REPO, cache_dir=tmp_path / "hf", offline=False)
    assert model.vocab_size > 0 and model.name == "tiny-llama"
    assert any(p.endswith("/model.safetensors") for p in endpoint.requests)
    assert "Fetching" in capfd.readouterr().err  # the hub library's progress bar
    endpoint.requests.clear()
    load_model(REPO, cache_dir=tmp_path / "hf", offline=True)  # now cached: no download needed
    assert endpoint.requests == []


def test_without_allow_download_the_hub_is_not_asked_and_the_error_says_how(endpoint, tmp_path) -> None:
    with pytest.raises(ModelLoadError) as err:
        load_model(REPO, cache_dir=tmp_path / "hf")
    assert endpoint.requests == []
    msg = str(err.value)
    assert "--allow-download" in msg and "allow_download = true" in msg and "SPECECD_ALLOW_DOWNLOAD=1" in msg


def test_hf_hub_offline_wins(endpoint, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="HF_HUB_OFFLINE"):
        load_model(REPO, cache_dir=tmp_path / "hf", offline=False)
    assert endpoint.requests == []


def test_a_gated_model_asks_for_a_token(endpoint, tmp_path) -> None:
    with pytest.raises(ModelLoadError, match="hf_token"):
        load_model("tinyorg/gated", cache_dir=tmp_path / "hf", offline=False)


def test_cli_flag_allows_the_download(hub, tmp_path) -> None:
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HUB_CACHE": str(tmp_path / "hf"), "PYTHONPATH": str(ROOT),
           "OMP_NUM_THREADS": "1"}  # fmt: skip
    env.pop("HF_HUB_OFFLINE", None)
    cmd = [sys.executable, "-m", "edge_agent.cli", "generate", "hi", "--raw", "--mode", "edge-only",
           "--draft", REPO, "--max-new-tokens", "3", "--json"]  # fmt: skip
    refused = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert refused.returncode == 1 and "--allow-download" in refused.stderr
    done = subprocess.run([*cmd, "--allow-download"], env=env, capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert '"token_ids"' in done.stdout


def test_compose_workers_may_download_their_target() -> None:
    import yaml

    compose = yaml.safe_load((ROOT / "deploy" / "docker" / "compose.yaml").read_text())
    workers = [s for name, s in compose["services"].items() if name.startswith("worker")]
    assert workers
    for w in workers:
        value = os.path.expandvars(
            str(w["environment"]["SPECECD_ALLOW_DOWNLOAD"]).replace("${SPECECD_ALLOW_DOWNLOAD:-1}", "1")
        )
        assert value == "1" and "hf_token" in w["secrets"]


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("openssl"), reason="setup.sh sets owners as root")
def test_compose_hf_token_secret_is_readable_by_the_worker_uid(tmp_path) -> None:
    env = {
        **os.environ,
        "SPECECD_BROKER_DIR": str(tmp_path / "broker"),
        "SPECECD_SECRETS_DIR": str(tmp_path / "s"),
    }
    proc = subprocess.run(["bash", str(ROOT / "deploy" / "docker" / "setup.sh")], env=env, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    st = (tmp_path / "s" / "hf_token").stat()
    # compose bind-mounts the file as it is: the worker image's uid 10001 reads it through the group
    assert st.st_gid == 10001 and stat.S_IMODE(st.st_mode) == 0o640
