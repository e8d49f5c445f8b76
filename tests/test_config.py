"""Configuration: validation errors name key, value and what is allowed; precedence; secrets masked."""

from __future__ import annotations

import argparse
import logging
import re
from pathlib import Path

import pytest

from shared.config import (
    KEYS,
    Secret,
    add_config_arguments,
    config_from_args,
    env_name,
    keys_for,
    load_edge_config,
    load_worker_config,
)
from shared.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
EDGE_ENV = {"SPECECD_DEVICE": "dev1"}  # the one key an edge config cannot do without


def write(tmp_path: Path, text: str, name: str = "c.toml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


# (kind, key, value as TOML text, fragment of the "allowed" text)
FILE_CASES = [
    ("edge", "gamma", "0", "from 1 to 64"),
    ("edge", "gamma", "65", "from 1 to 64"),
    ("edge", "gamma", '"4"', "an integer"),  # TOML is typed: no strings for numbers
    ("edge", "gamma", "4.5", "an integer"),
    ("edge", "gamma", '"fast"', "'auto' or an integer"),
    ("edge", "temperature", "-0.5", "[0.0, 100.0]"),
    ("edge", "top_p", "0.0", "(0.0, 1.0]"),
    ("edge", "top_p", "1.5", "(0.0, 1.0]"),
    ("edge", "top_k", "-1", "from 0"),
    ("edge", "seed", "-1", "from 0"),
    ("edge", "mode", '"turbo"', "'speculative', 'cloud-only', 'edge-only'"),
    ("edge", "on_cloud_unreachable", '"retry"', "'draft', 'wait', 'fail'"),
    ("edge", "broker", '"mqtt://host:1883"', "no scheme"),
    ("edge", "broker", '"host:70000"', "port 1 to 65535"),
    ("edge", "broker", '"host:0"', "port 1 to 65535"),
    ("edge", "listen", '"8000"', "HOST:PORT to listen on"),
    ("edge", "listen", '"localhost:http"', "HOST:PORT to listen on"),
    ("edge", "model_device", '"gpu"', "'cuda:N'"),
    ("edge", "dtype", '"fp16"', "'bfloat16'"),
    ("edge", "log_level", '"verbose"', "'debug'"),
    ("edge", "log_json", '"yes"', "true or false"),
    ("edge", "watchdog", "1", "true or false"),
    ("edge", "keepalive", "1", "from 5 to 3600"),
    ("edge", "device", '"dev/1"', "appears in MQTT topics"),
    ("edge", "username", '"a b"', "appears in MQTT topics"),
    ("edge", "max_queue", "0", "from 1"),
    ("edge", "round_timeout_ms", "0", "from 1"),
    ("edge", "max_new_tokens", "0", "from 1"),
    ("edge", "draft", '""', "non-empty"),
    ("worker", "max_sessions", "0", "from 1"),
    ("worker", "metrics_listen", '"9464"', "HOST:PORT to listen on"),
    ("worker", "worker_id", '"w+1"', "appears in MQTT topics"),
    ("worker", "target", "3", "non-empty string"),
]


def load(kind: str, path: str | None = None, env: dict | None = None, **overrides):
    loader = load_edge_config if kind == "edge" else load_worker_config
    base = dict(EDGE_ENV) if kind == "edge" else {}
    return loader(path, env={**base, **(env or {})}, overrides=overrides)


@pytest.mark.parametrize(("kind", "key", "toml", "allowed"), FILE_CASES, ids=lambda x: str(x))
def test_invalid_file_value_names_key_value_and_allowed(tmp_path, kind, key, toml, allowed):
    path = write(tmp_path, f"{key} = {toml}\n")
    with pytest.raises(ConfigError) as info:
        if key in ("device", "username"):  # no SPECECD_DEVICE, which would hide the file's value
            load_edge_config(path, env={})
        else:
            load(kind, path)
    err = info.value
    assert err.key == key
    assert allowed in err.allowed
    assert f"file {path}" in err.allowed  # says where the bad value came from
    assert f"{key!r}" in str(err) and "allowed" in str(err)


ENV_CASES = [
    ("edge", "gamma", "four", "an integer from 1 to 64"),
    ("edge", "gamma", "", "an integer from 1 to 64"),
    ("edge", "temperature", "nan", "a number in [0.0, 100.0]"),
    ("edge", "temperature", "hot", "a number"),
    ("edge", "watchdog", "maybe", "1/0, yes/no, on/off"),
    ("edge", "broker", "host:port", "HOST or HOST:PORT"),
    ("worker", "max_sessions", "-3", "from 1 to"),
    ("worker", "log_json", "2", "true or false"),
]


@pytest.mark.parametrize(("kind", "key", "text", "allowed"), ENV_CASES, ids=lambda x: str(x))
def test_invalid_env_value_names_the_variable(kind, key, text, allowed):
    with pytest.raises(ConfigError) as info:
        load(kind, env={env_name(key): text})
    assert info.value.key == key
    assert info.value.value == text
    assert allowed in info.value.allowed
    assert f"environment variable {env_name(key)}" in info.value.allowed


def test_invalid_flag_value_names_the_flag():
    with pytest.raises(ConfigError) as info:
        load("edge", round_timeout_ms="soon")
    assert info.value.key == "round_timeout_ms"
    assert "flag --round-timeout-ms" in info.value.allowed


def test_env_text_values_are_converted():
    cfg = load(
        "edge",
        env={
            "SPECECD_GAMMA": "7",
            "SPECECD_TEMPERATURE": "0.7",
            "SPECECD_LOG_JSON": "yes",
            "SPECECD_LOG_LEVEL": "DEBUG",
        },
    )
    assert (cfg.gamma, cfg.temperature, cfg.log_json, cfg.log_level) == (7, 0.7, True, "DEBUG")
    assert cfg.sampling.temperature == 0.7


def test_unknown_file_key_suggests_the_close_one(tmp_path):
    with pytest.raises(ConfigError) as info:
        load("edge", write(tmp_path, "gama = 4\n"))
    assert info.value.key == "gama"
    assert "did you mean 'gamma'?" in info.value.allowed


def test_key_of_the_other_side_is_an_error_with_a_hint(tmp_path):
    with pytest.raises(ConfigError) as info:
        load("edge", write(tmp_path, "max_sessions = 4\n"))
    assert info.value.key == "max_sessions"
    assert "worker key" in info.value.allowed and "[worker]" in info.value.allowed


def test_unknown_override_key_is_an_error():
    with pytest.raises(ConfigError) as info:
        load("worker", gamma=4)
    assert info.value.key == "gamma"
    assert "edge key" in info.value.allowed


def test_unknown_env_variable_is_warned_not_fatal(caplog):
    with caplog.at_level(logging.WARNING, logger="shared.config"):
        cfg = load("edge", env={"SPECECD_GAMA": "9"})
    assert cfg.gamma == "auto"
    assert "SPECECD_GAMA" in caplog.text and "SPECECD_GAMMA" in caplog.text


def test_bad_toml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError) as info:
        load("edge", write(tmp_path, "gamma = = 4\n"))
    assert info.value.key == "config" and "TOML" in info.value.allowed
    with pytest.raises(ConfigError) as info:
        load("edge", str(tmp_path / "absent.toml"))
    assert info.value.key == "config" and "absent.toml" in str(info.value)


def test_precedence_flag_over_env_over_file_over_default(tmp_path):
    path = write(tmp_path, "gamma = 5\nseed = 11\n")
    env = {"SPECECD_GAMMA": "6"}
    assert load("edge").gamma == "auto"
    assert load("edge", path).gamma == 5
    assert load("edge", path, env).gamma == 6
    cfg = load("edge", path, env, gamma="7")
    assert cfg.gamma == 7 and cfg.seed == 11
    assert cfg.sources["gamma"] == "flag --gamma"
    assert cfg.sources["seed"] == f"file {path}"
    assert cfg.sources["top_k"] == "default"


def test_config_path_from_env(tmp_path):
    path = write(tmp_path, "gamma = 9\n")
    assert load("edge", env={"SPECECD_CONFIG": path}).gamma == 9


def test_argparse_unset_flags_do_not_override(tmp_path):
    path = write(tmp_path, "gamma = 5\nlog_json = true\nbroker = 'filehost:1883'\n")
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, "edge")
    env = {**EDGE_ENV, "SPECECD_BROKER": "envhost:1884"}

    args = parser.parse_args(["--config", path])
    cfg = config_from_args(args, "edge", env=env)
    assert (cfg.gamma, cfg.log_json, cfg.broker.host, cfg.broker.port) == (5, True, "envhost", 1884)

    args = parser.parse_args(["--config", path, "--gamma", "2", "--no-log-json", "--broker", "cli:1999"])
    cfg = config_from_args(args, "edge", env=env)
    assert (cfg.gamma, cfg.log_json, cfg.broker.host, cfg.broker.port) == (2, False, "cli", 1999)


def test_worker_flags_and_defaults(tmp_path):
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, "worker")
    args = parser.parse_args(
        ["--worker-id", "w7", "--max-sessions", "3", "--metrics-listen", "0.0.0.0:9464", "--target", "/m/t"]
    )
    cfg = config_from_args(args, "worker", env={})
    assert (cfg.worker_id, cfg.max_sessions, cfg.target) == ("w7", 3, "/m/t")
    assert (cfg.metrics_listen.host, cfg.metrics_listen.port) == ("0.0.0.0", 9464)
    assert str(cfg.metrics_listen) == "0.0.0.0:9464"
    assert load("worker", env={"SPECECD_USERNAME": "worker-2"}).worker_id == "worker-2"


def test_no_flag_carries_a_secret_value():
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, "worker")
    flags = {a for action in parser._actions for a in action.option_strings}
    assert "--password-file" in flags and "--hf-token-file" in flags
    assert "--password" not in flags and "--hf-token" not in flags


def test_shared_file_with_sections(tmp_path):
    text = """
broker = "mq.example:1883"
[edge]
username = "dev-a"
gamma = 6
[worker]
username = "worker-a"
max_sessions = 9
"""
    path = write(tmp_path, text)
    edge = load_edge_config(path, env={})
    worker = load_worker_config(path, env={})
    assert (edge.broker.host, edge.device, edge.gamma) == ("mq.example", "dev-a", 6)
    assert (worker.broker.host, worker.worker_id, worker.max_sessions) == ("mq.example", "worker-a", 9)


def test_device_defaults_to_username_else_the_host_name():
    from shared.config import default_name

    assert load_edge_config(None, env={"SPECECD_USERNAME": "dev9"}).device == "dev9"
    # an anonymous dev broker needs no --device: the host name, as the worker's id
    assert load_edge_config(None, env={}).device == default_name()
    assert re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", default_name())


def test_tls_rules(tmp_path):
    ca = tmp_path / "ca.crt"
    ca.write_text("x")
    cfg = load("edge", write(tmp_path, 'broker = "mq"\ntls_ca = "ca.crt"\n'))  # relative to the file
    assert cfg.broker.tls and cfg.broker.port == 8883 and cfg.broker.tls_ca == str(ca)
    assert load("edge", env={"SPECECD_BROKER": "mq"}).broker.port == 1883
    with pytest.raises(ConfigError) as info:
        load("edge", tls_cert=str(ca))
    assert info.value.key == "tls_key"
    with pytest.raises(ConfigError) as info:
        load("edge", tls_insecure=True)
    assert info.value.key == "tls_insecure"
    with pytest.raises(ConfigError) as info:
        load("edge", tls_ca=str(tmp_path / "nope.crt"))
    assert info.value.key == "tls_ca" and "an existing file" in info.value.allowed


SECRET = "s3cr3t-Pa55"


def test_password_file_and_env_precedence(tmp_path):
    pw = tmp_path / "pw"
    pw.write_text(SECRET + "\n")
    path = write(tmp_path, f'username = "dev1"\npassword_file = "{pw}"\n')
    cfg = load("edge", path)
    assert cfg.broker.password.reveal() == SECRET  # trailing newline stripped
    cfg = load("edge", path, env={"SPECECD_PASSWORD": "from-env"})
    assert cfg.broker.password.reveal() == "from-env" and cfg.broker.password_file is None
    other = tmp_path / "pw2"
    other.write_text("from-flag-file")
    cfg = load("edge", path, env={"SPECECD_PASSWORD": "from-env"}, password_file=str(other))
    assert cfg.broker.password.reveal() == "from-flag-file"


def test_password_and_password_file_in_one_place_is_an_error(tmp_path):
    pw = tmp_path / "pw"
    pw.write_text("x")
    with pytest.raises(ConfigError) as info:
        load("edge", env={"SPECECD_PASSWORD": SECRET, "SPECECD_PASSWORD_FILE": str(pw)})
    assert info.value.key == "password"
    assert SECRET not in str(info.value)


def test_empty_or_missing_secret_file(tmp_path):
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(ConfigError) as info:
        load("worker", password_file=str(empty), username="w1")
    assert info.value.key == "password_file" and "empty" in info.value.allowed
    assert load("worker", hf_token_file=str(empty)).hf_token is None  # empty token file: no token
    with pytest.raises(ConfigError) as info:
        load("worker", password_file=str(tmp_path / "none"))
    assert info.value.key == "password_file"


def test_password_needs_username():
    with pytest.raises(ConfigError) as info:
        load_edge_config(None, env={"SPECECD_PASSWORD": SECRET, "SPECECD_DEVICE": "d"})
    assert info.value.key == "username"
    assert SECRET not in str(info.value)


def test_secrets_never_in_repr_str_or_logs(tmp_path, caplog):
    tok = tmp_path / "hf"
    tok.write_text("hf_TOKENVALUE123")
    cfg = load(
        "worker",
        env={"SPECECD_USERNAME": "w1", "SPECECD_PASSWORD": SECRET, "SPECECD_HF_TOKEN_FILE": str(tok)},
    )
    assert cfg.broker.password.reveal() == SECRET
    assert cfg.hf_token.reveal() == "hf_TOKENVALUE123"
    with caplog.at_level(logging.DEBUG):
        logging.getLogger("spececd.test").info("config %s %r %s", cfg, cfg, cfg.broker.password)
        logging.getLogger("spececd.test").info(f"{cfg.hf_token} {cfg.broker}")
    texts = [repr(cfg), str(cfg), f"{cfg.broker.password}", caplog.text, str(vars(cfg))]
    for text in texts:
        assert SECRET not in text and "TOKENVALUE" not in text
    assert "Secret('********')" in repr(cfg)


def test_bad_secret_value_is_masked_in_the_error():
    with pytest.raises(ConfigError) as info:
        load("edge", env={"SPECECD_USERNAME": "d", "SPECECD_PASSWORD": " "})
    assert info.value.key == "password"
    assert info.value.value == "********"


def test_secret_equality_and_type():
    assert Secret("a") == Secret("a") and Secret("a") != Secret("b")
    assert Secret("a") != "a"


def _with_tmp_paths(text: str, tmp_path: Path) -> str:
    """Point the example's /etc/... files at real temp files so the example loads here."""

    def repl(m: re.Match) -> str:
        p = tmp_path / Path(m.group(1)).name
        p.write_text("secret-from-example\n")
        return f'"{p}"'

    return re.sub(r'"(/etc/spececd/[^"]+)"', repl, text)


@pytest.mark.parametrize("kind", ["edge", "worker"])
def test_example_configs_load(tmp_path, kind):
    text = (ROOT / "deploy" / f"{kind}.toml").read_text()
    path = write(tmp_path, _with_tmp_paths(text, tmp_path))
    if kind == "edge":  # the password comes from systemd's EnvironmentFile
        cfg = load_edge_config(path, env={"SPECECD_PASSWORD": "pw"})
    else:
        cfg = load_worker_config(path, env={"SPECECD_USERNAME": "w1"})
    assert cfg.broker.tls
    if kind == "edge":
        assert cfg.device == "kitchen-01" and cfg.broker.password is not None and cfg.watchdog
    else:
        assert str(cfg.metrics_listen) == "0.0.0.0:9464"


def test_every_key_is_documented_in_the_deploy_readme():
    readme = (ROOT / "deploy" / "README.md").read_text()
    rows = {m.group(1) for m in re.finditer(r"^\| `([a-z_]+)` \|", readme, re.M)}
    assert set(KEYS) <= rows, f"undocumented keys: {sorted(set(KEYS) - rows)}"
    for key in KEYS:
        assert env_name(key) in readme
    assert set(keys_for("edge")) | set(keys_for("worker")) == set(KEYS)


def test_apply_environment_hands_cache_and_token_to_libraries(tmp_path, monkeypatch):
    from shared.config import apply_environment

    monkeypatch.delenv("SPECECD_CACHE", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    token = tmp_path / "hf"
    token.write_text("hf_secret\n")
    conf = tmp_path / "w.toml"
    conf.write_text(f'cache = "models"\nhf_token_file = "{token}"\n')
    cfg = load_worker_config(str(conf), env={})
    apply_environment(cfg)
    import os

    assert os.environ["SPECECD_CACHE"] == str(tmp_path / "models")
    assert os.environ["HF_TOKEN"] == "hf_secret"
