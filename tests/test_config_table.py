"""One source of truth for configuration: every key of ``shared.config_keys.KEYS`` is walked
through the file, the environment, every entry point's flags and deploy/README.md; and the
disagreements of issue 11 item 10 stay fixed."""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import subprocess
import sys
from pathlib import Path

import pytest

from cloud_worker.cli import build_parser as worker_parser
from edge_agent.cli import build_parser as edge_parser
from shared.config import (
    KEYS,
    add_broker_arguments,
    broker_settings_from_args,
    config_from_args,
    env_name,
    flag_name,
    load_config,
)
from shared.config_keys import DEFAULT_MAX_SESSIONS, MAX_GAMMA, BadValue, parse_hostport
from shared.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def sample(key: str, tmp_path: Path) -> tuple[object, str]:
    """A valid non-default value of ``key``: (as TOML value, as env/flag text)."""
    spec = KEYS[key]
    if spec.path:
        f = tmp_path / f"{key}.txt"
        f.write_text("secret-ish\n")
        return str(f), str(f)
    if spec.is_bool:
        return (not spec.default), str(not spec.default).lower()
    if spec.choices:
        value = next(c for c in spec.choices if c != spec.default)
        return value, value
    if key in ("broker",):
        return "mq.example:1884", "mq.example:1884"
    if key in ("listen", "metrics_listen"):
        return "127.0.0.1:9999", "127.0.0.1:9999"
    if key == "model_device":
        return "cpu", "cpu"
    if key == "gamma":  # an integer or "auto"
        return 5, "5"
    if key == "batch_window_ms":  # "auto" (the default) or a number of ms
        return 20.0, "20.0"
    if key == "shared_prefill_tokens":  # "auto" (the default) or a number of positions
        return 24, "24"
    if isinstance(spec.default, bool):
        raise AssertionError(key)
    if isinstance(spec.default, int):
        return spec.default + 1, str(spec.default + 1)
    if isinstance(spec.default, float):
        value = min(spec.default + 0.5, 1.0) if key == "top_p" else spec.default + 0.5
        value = 0.5 if value == spec.default else value
        return value, str(value)
    return "name-1", "name-1"


def entry_parsers(kind: str) -> list[argparse.ArgumentParser]:
    """Every parser that takes the config of ``kind``: edge generate/serve/chat, the worker."""
    if kind == "worker":
        return [worker_parser()]
    sub = next(a for a in edge_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return [sub.choices[c] for c in ("generate", "serve", "chat")]


def base_args(parser: argparse.ArgumentParser) -> list[str]:
    return ["hello"] if parser.prog.endswith("generate") else []


def loaded(cfg, key: str):
    """The value a config object holds for ``key``."""
    broker = cfg.broker
    mapped = {"broker": str(broker.address), "username": broker.username, "password": broker.password}
    if key in mapped:
        return mapped[key]
    if hasattr(broker, key) and not hasattr(cfg, key):
        return getattr(broker, key)
    return getattr(cfg, key)


@pytest.mark.parametrize("key", sorted(KEYS))
def test_every_key_through_file_env_flag_and_docs(tmp_path, key):
    spec = KEYS[key]
    readme = (ROOT / "deploy" / "README.md").read_text()
    row = re.search(rf"^\| `{key}` \|(.*)$", readme, re.M)
    assert row, f"{key} has no row in deploy/README.md"
    assert f"`{env_name(key)}`" in row.group(1)
    if not spec.secret:
        assert f"`{flag_name(key)}`" in row.group(1)
        for alias in spec.aliases:
            assert f"`{alias}`" in row.group(1)
    side = "both" if len(spec.kinds) == 2 else spec.kinds[0]
    assert f"| {side} |" in row.group(1)
    if spec.default is not None and not isinstance(spec.default, bool):
        assert str(spec.default) in row.group(1).replace(",", ""), (
            f"{key}: default {spec.default} not documented"
        )
    toml_value, text = sample(key, tmp_path)
    extra: dict[str, str] = {}
    if key in ("password", "password_file"):
        extra = {"SPECECD_USERNAME": "u1"}
    if key in ("tls_cert", "tls_key"):
        other = "tls_key" if key == "tls_cert" else "tls_cert"
        extra = {env_name(other): sample(other, tmp_path)[1]}
    if key == "tls_insecure":
        extra = {"SPECECD_TLS_CA": sample("tls_ca", tmp_path)[1]}
    for kind in spec.kinds:
        # the TOML name is the key itself
        conf = tmp_path / f"{kind}.toml"
        rendered = f'"{toml_value}"' if isinstance(toml_value, str) else str(toml_value).lower()
        conf.write_text(f"{key} = {rendered}\n")
        if not spec.secret:
            cfg = load_config(kind, str(conf), env=extra)
            assert cfg.sources[key].startswith("file "), (kind, key, cfg.sources[key])
        # the environment variable
        cfg = load_config(kind, None, env={**extra, env_name(key): text})
        assert cfg.sources[key] == f"environment variable {env_name(key)}"
        if spec.secret:
            continue
        expected = loaded(cfg, key)
        # the flag, on every entry point of this kind
        for parser in entry_parsers(kind):
            flag = [flag_name(key)] if spec.is_bool and toml_value else None
            if spec.is_bool:
                argv = [flag_name(key) if toml_value else "--no-" + flag_name(key)[2:]]
            else:
                argv = flag or [flag_name(key), text]
            args = parser.parse_args([*base_args(parser), *argv])
            cfg = config_from_args(args, kind, env=extra)
            assert cfg.sources[key] == f"flag {flag_name(key)}", (parser.prog, key)
            assert loaded(cfg, key) == expected, (parser.prog, key)
            helptext = parser.format_help()
            assert env_name(key) in helptext
            for choice in spec.choices or ():
                assert choice in helptext, f"--help of {parser.prog} does not show {choice!r} for {key}"


def test_no_pipeline_is_accepted_by_every_edge_command():
    for parser in entry_parsers("edge"):
        args = parser.parse_args([*base_args(parser), "--no-pipeline"])
        assert config_from_args(args, "edge", env={}).pipeline is False


def test_serve_options_are_config_keys():
    cfg = load_config("edge", None, env={"SPECECD_MAX_CONCURRENT": "3", "SPECECD_MODEL_NAME": "mine"})
    assert (cfg.max_concurrent, cfg.model_name) == (3, "mine")
    assert load_config("edge", None, env={"SPECECD_TARGET": "/models/tgt-7b/"}).model_name == "tgt-7b"


def test_gamma_has_one_range_everywhere():
    from edge_agent.speculative import GenerateOptions
    from shared.protocol import MAX_GAMMA as PROTOCOL_MAX

    assert MAX_GAMMA == PROTOCOL_MAX
    assert load_config("edge", None, env={"SPECECD_GAMMA": str(MAX_GAMMA)}).gamma == MAX_GAMMA
    GenerateOptions(gamma=MAX_GAMMA)
    with pytest.raises(ConfigError):
        load_config("edge", None, env={"SPECECD_GAMMA": str(MAX_GAMMA + 1)})


def test_max_sessions_has_one_default():
    import inspect

    from cloud_worker.verifier import DEFAULT_MAX_SESSIONS as VERIFIER_DEFAULT
    from cloud_worker.worker import Worker

    assert load_config("worker", None, env={}).max_sessions == DEFAULT_MAX_SESSIONS
    assert VERIFIER_DEFAULT == DEFAULT_MAX_SESSIONS
    assert inspect.signature(Worker).parameters["max_sessions"].default == DEFAULT_MAX_SESSIONS
    from bench.procs import Procs

    assert inspect.signature(Procs.start_worker).parameters["max_sessions"].default == DEFAULT_MAX_SESSIONS
    from bench.inprocess import InProcessPair

    assert (
        inspect.signature(InProcessPair.from_models).parameters["max_sessions"].default
        == DEFAULT_MAX_SESSIONS
    )


@pytest.mark.parametrize("device", ["mps", "cuda:99"])
def test_a_device_this_machine_lacks_is_a_config_error(device):
    if device == "mps":
        import torch

        if torch.backends.mps.is_available():
            pytest.skip("this machine has MPS")
    with pytest.raises(ConfigError) as info:
        load_config("worker", None, env={"SPECECD_MODEL_DEVICE": device})
    assert info.value.key == "model_device"
    assert "use 'auto' or 'cpu'" in info.value.allowed


def test_one_hostport_parser():
    from bench.delay_proxy import _hostport as proxy_hostport
    from shared.mqtt import BrokerConfig

    assert proxy_hostport("[::1]:1883") == ("::1", 1883)

    assert parse_hostport("[::1]", default_port=1883) == ("::1", 1883)
    assert (BrokerConfig.parse_hostport("[::1]").host, BrokerConfig.parse_hostport("[::1]").port) == (
        "::1",
        1883,
    )
    for bad in ("mqtt://h:1883", "h:0", "h:70000", "h:x"):
        with pytest.raises(BadValue):
            parse_hostport(bad, default_port=1883)
        with pytest.raises(Exception, match="HOST"):
            BrokerConfig.parse_hostport(bad)


def test_tap_takes_the_same_tls_flags_and_the_old_ones(tmp_path):
    ca = tmp_path / "ca.crt"
    ca.write_text("x")
    for flag in ("--tls-ca", "--ca-file"):
        p = argparse.ArgumentParser()
        add_broker_arguments(p)
        settings = broker_settings_from_args(p.parse_args(["--broker", "h", flag, str(ca)]), env={})
        assert settings.tls and settings.port == 8883 and settings.tls_ca == str(ca)
    from shared.tap import _parser

    help_text = _parser().format_help()
    assert "--tls-ca" in help_text and "--ca-file" in help_text


def test_add_device_names_are_agent_names():
    """broker/add-device.sh and the agent accept the same names (kitchen.01 included)."""
    common = (ROOT / "broker" / "_common.sh").read_text()
    shell_re = re.search(r"=~ \^(\[[^\]]+\]\{1,64\})\$", common).group(1)
    for name in ("kitchen.01", "kitchen-01", "a_b", "x" * 64, "a.b.c"):
        assert re.fullmatch(shell_re, name)
        assert load_config("edge", None, env={"SPECECD_DEVICE": name}).device == name
    for name in ("a/b", "a+b", "a#", "a b", "x" * 65):
        assert not re.fullmatch(shell_re, name)
        with pytest.raises(ConfigError):
            load_config("edge", None, env={"SPECECD_DEVICE": name})


@pytest.mark.parametrize(
    "module", ["edge_agent.cli", "cloud_worker.cli", "shared.tap", "shared.demo", "bench.cli"]
)
def test_version_flag(module):
    out = subprocess.run(
        [sys.executable, "-m", module, "--version"], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert out.returncode == 0, out.stderr
    assert re.search(r"\d+\.\d+", out.stdout), out.stdout


def test_edge_needs_no_device_on_an_anonymous_broker():
    parser = entry_parsers("edge")[0]
    cfg = config_from_args(parser.parse_args(["hi"]), "edge", env={})
    assert cfg.device and re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", cfg.device)


def test_help_shows_choices():
    for parser in (*entry_parsers("edge"), worker_parser()):
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            parser.print_help()
        assert "{debug,info,warning,error,critical}" in buf.getvalue()


def test_bench_round_timeout_in_ms_as_the_edge():
    from bench.cli import build_parser, check_args

    args = build_parser().parse_args(["--round-timeout-ms", "2500"])
    check_args(args)
    assert args.round_timeout_s == 2.5
    old = build_parser().parse_args(["--round-timeout-s", "3"])  # the old spelling still works
    check_args(old)
    assert (old.round_timeout_ms, old.round_timeout_s) == (3000, 3.0)
